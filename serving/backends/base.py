"""The interface every engine implements; nothing above it knows which engine runs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class AudioPrompt:
    """One question about one clip (mono float32 at the backend's sample rate)."""

    samples: np.ndarray
    question: str
    max_new_tokens: int
    # ask for the audio contrast of the answer (Generation.answer_logprob / blank_logprob); optional for engines
    contrast: bool = False
    # ask for the audio tower's layers on this clip (Generation.tower_layers); optional for engines
    tower_layers: bool = False


@dataclass(frozen=True)
class Generation:
    text: str
    num_tokens: int
    # log P(answer tokens | real audio) and | blank audio (zeros, same length), in nats; None when not computed
    answer_logprob: float | None = None
    blank_logprob: float | None = None
    prompt_tokens: int = 0  # the prompt's tokens, audio placeholders expanded (the chat API's usage)
    # float32 [2, positions, d_model]: the audio tower's last and middle layer on the clip, as
    # models.pretrained.whisper.encode_layers returns them (after the tower's avg-pool); None when not asked or not computed
    tower_layers: np.ndarray | None = field(default=None, compare=False, repr=False)


class Backend(Protocol):
    model_name: str
    sample_rate: int
    max_audio_s: float

    def generate(self, prompts: list[AudioPrompt]) -> list[Generation]:
        """Greedy answers for a batch of prompts, in order."""
        ...
