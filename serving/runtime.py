"""Start Ray and Serve for a local run: loopback only, private temp dir, no dashboard."""

from __future__ import annotations

import logging
import os

import ray
from ray import serve

from serving.app import build
from serving.config import Settings

APP_NAME = "earwitness"


def start_ray(settings: Settings) -> None:
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if settings.ray_address:
        ray.init(address=settings.ray_address, logging_level=logging.WARNING)
        return
    # A local cluster binds loopback, not the host's address; Ray's default token auth stays on.
    ray.init(
        _node_ip_address="127.0.0.1",
        include_dashboard=False,
        _temp_dir=settings.ray_temp_dir,
        num_cpus=settings.num_cpus,
        logging_level=logging.WARNING,
    )


def start(settings: Settings, blocking: bool = False) -> None:
    """Serve the application on ``settings.host:settings.port``; returns once it is ready."""
    start_ray(settings)
    serve.start(http_options={"host": settings.host, "port": settings.port})
    serve.run(build(settings), name=APP_NAME, route_prefix="/", blocking=blocking)


def stop() -> None:
    serve.shutdown()
    ray.shutdown()
