"""Earwitness serving: HTTP edge, Ray Serve deployments, model backends, guard and metrics."""
