"""The verifier deployment: the absent-sound verifier and its text encoder, scaled apart from the model.

It owns the verifier (embedded or CLAP, :func:`serving.guard.verifier.load_verifier`) and the
text encoder that matches mentions to ontology classes. The ingress calls it concurrently with
the model, so on a guarded request its audio forward overlaps generation.
"""

from __future__ import annotations

import asyncio
import logging

import numpy as np
import torch
from ray import serve

from serving.config import Settings
from serving.heap import freeze_startup_heap

log = logging.getLogger("earwitness.verifier")


@serve.deployment(name="VerifierServer")
class VerifierServer:
    def __init__(self, settings: dict):
        from serving.guard.verifier import load_verifier

        self.settings = Settings(**settings)
        if self.settings.topology == "split":  # fused: the process's threads are the model's to set
            torch.set_num_threads(max(1, int(self.settings.verifier_cpus)))  # a fractional share gets one thread
        self.verifier = load_verifier(self.settings.verifier)
        # warm up: the audio path and the text encoder
        self.verifier.verify(np.zeros(self.verifier.sample_rate, dtype=np.float32), ["a dog barking"])
        freeze_startup_heap()
        log.info("verifier %s ready", self.verifier.name)

    def info(self) -> dict:
        return self.verifier.info()

    async def assess(self, samples: np.ndarray, texts: list[str]) -> dict:
        """Every class's probability for the clip, plus ``texts`` matched to classes (one call, one audio forward)."""
        return await asyncio.to_thread(self._assess, samples, texts)

    def _assess(self, samples: np.ndarray, texts: list[str]) -> dict:
        probs = self.verifier.class_probabilities(samples)
        events = [e.to_dict() for e in self.verifier.verify(samples, texts, probs)] if texts else []
        return {"probabilities": probs, "events": events, **self._thresholds()}

    async def match(self, texts: list[str]) -> list[dict]:
        return await asyncio.to_thread(self._match, texts)

    def _match(self, texts: list[str]) -> list[dict]:
        return [{"text": m.text, "event": m.event, "similarity": m.similarity} for m in self.verifier.match(texts)] if texts else []

    async def verify(self, samples: np.ndarray, texts: list[str]) -> dict:
        """``POST /v1/audio/verify``: per phrase, class, calibrated probability, present."""
        scores = await asyncio.to_thread(self.verifier.verify, samples, texts)
        return {"verifier": self.verifier.name, "events": [s.to_dict() for s in scores], **self._thresholds()}

    def _thresholds(self) -> dict:
        c = self.verifier.calibration
        return {"absent_below": c.absent_below, "present_above": c.present_above}
