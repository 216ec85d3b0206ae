"""Compose the Serve application: ingress → model (+ verifier), or ingress holding the model (``topology``),
with resources and scale from the settings.

``serve run serving.app:app_builder`` and Serve config files (``import_path: serving.app:app_builder``,
``args:`` holding any :class:`~serving.config.Settings` field) use :func:`app_builder`.
"""

from __future__ import annotations

import uuid
from pathlib import Path

from ray.serve import Application

from serving.config import Settings
from serving.ingress import Ingress
from serving.model_server import ModelServer
from serving.verifier_server import VerifierServer


def build(settings: Settings) -> Application:
    metrics_env = {"runtime_env": {"env_vars": {"PROMETHEUS_MULTIPROC_DIR": metrics_dir(settings)}}}
    from serving.placement import model_actor_options

    verifier = None
    if settings.verifier and settings.topology == "split":
        # the absent-sound verifier: its own deployment, scaled apart from the model
        verifier = VerifierServer.options(
            num_replicas=settings.verifier_replicas,
            max_ongoing_requests=settings.verifier_max_ongoing,
            max_queued_requests=settings.verifier_max_queued,
            ray_actor_options={"num_cpus": settings.verifier_cpus},
        ).bind(settings.model_dump())
    # the ingress takes every request at once (its model calls queue, or are refused, behind it)
    ingress_ongoing = max(64, settings.max_queued_requests + settings.max_ongoing_requests)
    if settings.topology == "fused":  # one deployment: each ingress replica holds model and verifier (serving/model_client.py)
        if settings.ingress_replicas != 1:
            raise ValueError("topology 'fused' scales with model_replicas (or model_min/max_replicas); leave ingress_replicas at 1")
        options = model_actor_options(settings)
        options["ray_actor_options"].update(metrics_env)
        if settings.verifier:  # the verifier runs in the same replica: its CPUs too (in the replica's bundle)
            options["ray_actor_options"]["num_cpus"] += settings.verifier_cpus
            for bundle in options.get("placement_group_bundles", [])[:1]:
                bundle["CPU"] += settings.verifier_cpus
        return Ingress.options(
            **_model_scale(settings), **options, max_ongoing_requests=ingress_ongoing, health_check_period_s=settings.health_check_period_s,
        ).bind(None, settings.model_dump())  # no handles: the replica builds both
    model = ModelServer.options(
        **_model_scale(settings),
        max_ongoing_requests=settings.max_ongoing_requests,
        max_queued_requests=settings.max_queued_requests,
        health_check_period_s=settings.health_check_period_s,
        **model_actor_options(settings),  # CPUs/GPUs, or a placement group for vLLM tensor parallelism
    ).bind(settings.model_dump())
    spread = {"max_replicas_per_node": settings.ingress_max_per_node} if settings.ingress_max_per_node else {}
    return Ingress.options(
        num_replicas=settings.ingress_replicas,
        max_ongoing_requests=ingress_ongoing,
        **spread,
        ray_actor_options={"num_cpus": 0, **metrics_env},
    ).bind(model, settings.model_dump(), verifier)


def metrics_dir(settings: Settings) -> str:
    """The replicas' multiprocess metrics directory: ``settings.metrics_dir`` (a node's, read by its exporter), or one
    fresh directory per application, so a local restart doesn't resurrect old counts."""
    return settings.metrics_dir or str(Path(settings.ray_temp_dir) / "metrics" / uuid.uuid4().hex[:12])


def _model_scale(settings: Settings) -> dict:
    """Fixed ``model_replicas``, or Serve autoscaling on ongoing requests when min/max replicas are set."""
    if settings.model_min_replicas is None and settings.model_max_replicas is None:
        return {"num_replicas": settings.model_replicas}
    low = settings.model_min_replicas if settings.model_min_replicas is not None else 1
    high = settings.model_max_replicas if settings.model_max_replicas is not None else max(low, settings.model_replicas)
    if low > high:
        raise ValueError(f"model_min_replicas ({low}) exceeds model_max_replicas ({high})")
    config = {"min_replicas": low, "max_replicas": high, "initial_replicas": min(max(low, settings.model_replicas), high)}
    if settings.target_ongoing_requests is not None:
        config["target_ongoing_requests"] = settings.target_ongoing_requests
    return {"autoscaling_config": config}


def app_builder(args: dict) -> Application:
    return build(Settings(**(args or {})))
