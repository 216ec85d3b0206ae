"""The verifier deployment as the guard and the verify endpoint call it: one typed method per call, over a Serve handle
(``split``) or the verifier in this process (``fused``, :class:`serving.model_client.InProcess`). Each returns an
awaitable the caller can ``cancel()``; the guard's answers are :class:`~models.verifier.assessment.Assessment` values."""

from __future__ import annotations

from typing import Awaitable

import numpy as np

from models.verifier.assessment import Assessment
from models.verifier.events import EventReport
from models.verifier.text import Match


class VerifierClient:
    def __init__(self, handle):
        self.handle = handle

    def info(self) -> Awaitable[dict]:
        """The verifier's name, classes, thresholds, the tower signature it reads (if any) and ``hears_clip``."""
        return self.handle.info.remote()

    def assess(self, samples: np.ndarray, targets: list[str]) -> Awaitable[Assessment]:
        """The clip heard (beside generation): every class's probability, and a presence question's target scored."""
        return self.handle.assess.remote(samples, targets)

    def prepare(self, samples: np.ndarray) -> Awaitable[None]:
        """A fused verifier's clip-only members hear the clip beside generation, before the model's layers exist."""
        return self.handle.prepare.remote(samples)

    def assess_layers(self, layers: np.ndarray, n_samples: int, targets: list[str], mentions: list[str],
                      samples: np.ndarray | None = None) -> Awaitable[Assessment]:
        """The clip scored from the served model's tower layers (after the answer), the answer's mentions placed with it."""
        clip = () if samples is None else (samples,)  # the clip travels only to a verifier that hears it
        return self.handle.assess_layers.remote(layers, n_samples, targets, mentions, *clip)

    def place(self, mentions: list[str]) -> Awaitable[list[Match]]:
        """An answer's mentions placed on the ontology."""
        return self.handle.place.remote(mentions)

    def events(self, samples: np.ndarray) -> Awaitable[EventReport]:
        """Every class the verifier detects over the clip, with its spans (``POST /v1/audio/events``, the guard's
        description of an open question's clip under ``correct``)."""
        return self.handle.events.remote(samples)

    def verify(self, samples: np.ndarray, texts: list[str]) -> Awaitable[dict]:
        """``POST /v1/audio/verify``'s answer: per phrase, class, probability and the verifier's own reading."""
        return self.handle.verify.remote(samples, texts)
