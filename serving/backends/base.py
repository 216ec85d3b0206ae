"""The interface every engine implements; nothing above it knows which engine runs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class AudioPrompt:
    """One question about one clip (mono float32 at the backend's sample rate)."""

    samples: np.ndarray
    question: str
    max_new_tokens: int


@dataclass(frozen=True)
class Generation:
    text: str
    num_tokens: int


class Backend(Protocol):
    model_name: str
    sample_rate: int
    max_audio_s: float

    def generate(self, prompts: list[AudioPrompt]) -> list[Generation]:
        """Greedy answers for a batch of prompts, in order."""
        ...
