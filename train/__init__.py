"""Earwitness training data: real recorded sound scenes and preference data against hallucinated sounds."""
