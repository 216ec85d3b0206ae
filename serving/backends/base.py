"""The interface every engine implements; nothing above it knows which engine runs."""

from __future__ import annotations

from dataclasses import dataclass, field

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


class Backend:
    """What every engine implements. The defaults are a synchronous engine's: the model server batches its
    requests (:meth:`generate`), it has no frozen pretrained tower to share, and nothing to stop."""

    model_name: str
    sample_rate: int
    max_audio_s: float
    processor: object  # the served processor: its tokenizer bounds questions before they join a batch
    is_async: bool = False  # True: the engine batches itself; the server awaits :meth:`generate_async` per request

    def generate(self, prompts: list[AudioPrompt]) -> list[Generation]:
        """Greedy answers for a batch of prompts, in order."""
        raise NotImplementedError

    async def generate_async(self, prompt: AudioPrompt, adapter=None) -> Generation:
        """One greedy answer, batched by the engine with whatever else is in flight (``adapter``: the LoRA to apply)."""
        raise NotImplementedError(f"{type(self).__name__} is synchronous: the model server batches its generate()")

    def warm_up(self) -> None:
        """One short generation, so the first request does not pay for lazy initialisation."""

    def shared_tower(self, adapter_dirs) -> str | None:
        """The frozen pretrained audio tower's signature when every adapter served leaves it as fetched (a verifier on
        the same tower can read its layers); None: no such tower."""
        return None

    def shutdown(self) -> None:
        """Stop what outlives the replica (vLLM's engine-core process)."""
