"""Resources of the model deployment: one replica's CPUs/GPUs, or a placement group for tensor parallelism.

With ``engine="vllm"`` and ``tensor_parallel_size > 1``, one replica drives vLLM workers on several GPUs
of one node: the replica actor takes the first bundle (CPUs, no GPU) and vLLM's Ray executor places
one worker per GPU bundle of the same placement group (``STRICT_PACK``: all on one node, NVLink).
Otherwise a replica is one actor with ``model_cpus`` / ``model_gpus``.
"""

from __future__ import annotations

from serving.config import Settings


def model_actor_options(settings: Settings) -> dict:
    """Keyword arguments for ``ModelServer.options(...)``: ``ray_actor_options`` (+ placement group)."""
    tp = settings.tensor_parallel_size if settings.engine == "vllm" else 1
    if tp <= 1:
        return {"ray_actor_options": {"num_cpus": settings.model_cpus, "num_gpus": settings.model_gpus}}
    gpus_per_worker = settings.model_gpus / tp if settings.model_gpus else 1.0
    bundles = [{"CPU": settings.model_cpus}] + [{"GPU": gpus_per_worker} for _ in range(tp)]
    return {
        "ray_actor_options": {"num_cpus": settings.model_cpus, "num_gpus": 0},
        "placement_group_bundles": bundles,
        "placement_group_strategy": "STRICT_PACK",
    }
