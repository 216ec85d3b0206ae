"""Helpers (no tests): extra Serve applications beside the session `server`, for fault and security tests.

Ray Serve has one HTTP proxy per cluster, so a variant with its own settings (a tiny timeout, a one-slot
queue, API keys) is deployed into the session's Ray cluster as another application under its own route
prefix, e.g. ``/faults-queue/v1/audio/qa``, and deleted when its tests are done.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import httpx


@contextmanager
def variant_app(server, name: str, **overrides):
    """Deploy ``build(settings + overrides)`` as application ``name`` at ``/name``; yields its base URL."""
    from ray import serve

    from serving.app import build

    url, settings = server
    lean = {"model_cpus": 0}  # 0 CPUs: fits beside the main app
    if "verifier" in type(settings).model_fields:
        lean["verifier"] = None  # no guard unless a test asks for it: fewer replicas to start
    variant = settings.model_copy(update={**lean, **overrides})
    serve.run(build(variant), name=name, route_prefix=f"/{name}", blocking=False)
    base = f"{url}/{name}"
    wait_ready(base, 90)
    try:
        yield base
    finally:
        serve.delete(name)


def wait_ready(base: str, timeout_s: float) -> float:
    """Seconds until ``base/readyz`` answers 200; raises after ``timeout_s``."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        try:
            if httpx.get(f"{base}/readyz", timeout=5).status_code == 200:
                return time.monotonic() - start
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{base} not ready after {timeout_s} s")
