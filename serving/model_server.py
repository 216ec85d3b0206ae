"""The model deployment: owns one backend, batches concurrent requests into one forward pass."""

from __future__ import annotations

import asyncio
import logging

import torch
from ray import serve

from models.registry import resolve
from serving.backends import AudioPrompt, Generation
from serving.config import Settings

log = logging.getLogger("earwitness.model")


def make_backend(settings: Settings):
    """The engine named by the settings; only the transformers one exists so far."""
    from serving.backends.hf import TransformersBackend

    spec = resolve(settings.model)
    adapter = settings.adapter or spec.adapters.get("default")
    return TransformersBackend.load(spec, adapter=adapter, device=settings.device, dtype=settings.dtype), adapter


@serve.deployment(name="ModelServer")
class ModelServer:
    def __init__(self, settings: dict):
        self.settings = Settings(**settings)
        if self.settings.model_cpus >= 1:
            torch.set_num_threads(int(self.settings.model_cpus))
        self.backend, self.adapter = make_backend(self.settings)
        self.backend.warm_up()
        self.generate.set_max_batch_size(self.settings.max_batch_size)
        self.generate.set_batch_wait_timeout_s(self.settings.batch_wait_timeout_s)
        log.info("model %s ready (adapter=%s)", self.backend.model_name, bool(self.adapter))

    def info(self) -> dict:
        return {
            "model": self.backend.model_name,
            "family": resolve(self.settings.model).family,
            "sample_rate": self.backend.sample_rate,
            "max_audio_s": self.backend.max_audio_s,
            "adapter": self.adapter,
        }

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def generate(self, prompts: list[AudioPrompt]) -> list[Generation]:
        # Off the event loop, so health checks and new arrivals are still served while it runs.
        return await asyncio.to_thread(self.backend.generate, prompts)
