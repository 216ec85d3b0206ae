"""Start Ray and Serve for a local run: loopback only, private temp dir, no dashboard."""

from __future__ import annotations

import logging
import os

import ray
from ray import serve

from serving.app import build
from serving.config import Settings
from serving.proxy import proxy_env

APP_NAME = "earwitness"


#: glibc malloc settings for every Ray process. By default glibc gives each thread that decodes a
#: request body its own arena (up to 8 per core) and, after a large block is freed, raises its mmap
#: threshold so that later large blocks come from those arenas and stay resident. In a soak the
#: ingress grew 56% to a plateau that way; two arenas and a fixed 128 KiB threshold (large blocks
#: mapped and returned to the system when freed) keep it flat (loadtests/results/soak.md).
MALLOC_ENV = {"MALLOC_ARENA_MAX": "2", "MALLOC_MMAP_THRESHOLD_": "131072"}

DIRECT_PORTS = 100  # ports reserved for ingress replicas on one node when direct_port is set


def direct_ingress_env(settings: Settings) -> dict[str, str]:
    """Ray Serve's direct ingress on ``settings.direct_port``, with its fast request path (empty when unset).

    Every ingress replica then runs its own HTTP server on the next free port of the range, so a
    request skips the proxy actor (one process hop and a re-serialised body fewer), while the proxy
    on ``port`` keeps serving. Replicas call each other over gRPC and run user code and the router on
    their own event loop (no cross-thread hand-offs): the parts of Serve's throughput-optimised mode
    that shorten a request. Its access-log buffering is left out, so logs still reach files at once.
    Read by Serve's controller and replicas when they start: on a cluster that Earwitness does not
    start (``ray_address``, Kubernetes) set them on the Ray nodes.
    """
    if settings.direct_port is None:
        return {}
    return {
        "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(settings.direct_port),
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(settings.direct_port + DIRECT_PORTS - 1),
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",  # Serve's 30 s would hold every shutdown
        "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1",
        "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
        "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
    }


def start_ray(settings: Settings) -> None:
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    for name, value in MALLOC_ENV.items():  # read by glibc when each Ray process starts
        os.environ.setdefault(name, value)
    os.environ.update(direct_ingress_env(settings))  # the local cluster's processes inherit them
    os.environ.update(proxy_env(settings.header_timeout_s))
    if settings.ray_address:
        ray.init(address=settings.ray_address, logging_level=logging.WARNING)
        return
    # A local cluster binds loopback, not the host's address; Ray's default token auth stays on. Ray announces that
    # default as a warning on every start; it is the setting we want, so its notice is kept to errors.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
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
    serve.start(proxy_location=settings.proxy_location, http_options={"host": settings.host, "port": settings.port})
    serve.run(build(settings), name=APP_NAME, route_prefix="/", blocking=blocking)


def stop() -> None:
    serve.shutdown()
    ray.shutdown()
