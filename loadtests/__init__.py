"""Locust load tests for Earwitness: ``python -m loadtests.run --host http://127.0.0.1:8000 --users 16 --duration 60s``."""
