"""Preference batches with audio on *both* sides, for :mod:`train.dpo`.

:class:`AudioPreferenceCollator` builds the batch the way TRL's vision collator does for images, but for
audio and *per side*: rows ``0..B-1`` are prompt+chosen conditioned on ``audio``, rows ``B..2B-1`` are
prompt+rejected conditioned on ``rejected_audio`` (or ``audio`` when it is None). Each row's prompt goes
through the processor with its own clip, so the number of ``<|AUDIO|>`` tokens always matches what the
processor expands for that clip (it can differ between the sides), and ``input_features`` /
``feature_attention_mask`` hold ``2B`` clips in row order. ACPO input-contrastive pairs (same prompt, same
answer, swapped audio) therefore differ only in the features the rejected side hears.

Dataset columns: ``prompt`` (question text, or a list of chat messages), ``chosen``, ``rejected``
(answer texts), ``audio`` (path, float array at 16 kHz, or a ``datasets.Audio`` dict), ``rejected_audio``
(same, or None) and optionally ``kind`` and anything else (ignored). Relative paths are resolved against
``audio_root`` (``train.data.prefs`` writes paths relative to the corpus directory).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

SAMPLE_RATE = 16_000
TURN_END = "<|im_end|>"  # ChatML: an assistant turn ends here, and generation stops on it


# --------------------------------------------------------------------------------------------- audio


def load_audio_file(path, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Decode a file or file-like object (anything libsndfile reads: wav, flac, ogg …) to float32 mono at ``sample_rate``."""
    import soundfile as sf
    import soxr

    source = str(path) if isinstance(path, (str, os.PathLike)) else path
    samples, sr = sf.read(source, dtype="float32", always_2d=True)
    mono = samples.mean(axis=1)
    if sr != sample_rate:
        mono = soxr.resample(mono, sr, sample_rate, quality="HQ")
    return np.ascontiguousarray(mono, dtype=np.float32)


def _resolve(path: str, root: Path | None) -> str:
    return str(root / path) if root is not None and not os.path.isabs(path) else path


# --------------------------------------------------------------------------------------------- collator


def prompt_text(processor, prompt: str | Sequence[Mapping[str, Any]]) -> str:
    """The serve-time prompt (see ``serving/backends/hf.py``): one user turn, audio first, then the question."""
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": prompt}]}]
    else:
        messages = list(prompt)
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


@dataclass
class AudioPreferenceCollator:
    """Preference batches with per-side audio, in the layout ``DPOTrainer._compute_loss`` expects.

    Returns ``input_ids``, ``attention_mask``, ``completion_mask`` (``2B`` rows, right-padded, chosen rows
    first) plus the processor's audio tensors for the same ``2B`` rows (``input_features``,
    ``feature_attention_mask``). Every key except ``completion_mask`` is passed to the model's forward.

    ``max_completion_tokens`` cuts long answers; prompts are never cut (cutting ``<|AUDIO|>`` tokens
    would desynchronise them from the features).
    """

    processor: Any
    load_audio: Callable[[str], np.ndarray] = load_audio_file
    audio_root: Path | None = None
    sample_rate: int = SAMPLE_RATE
    max_completion_tokens: int | None = None
    feature_dtype: torch.dtype | None = None
    _end: str = field(init=False, default="")

    def __post_init__(self):
        tokenizer = self.processor.tokenizer
        self._end = TURN_END if TURN_END in tokenizer.get_vocab() else tokenizer.eos_token
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer needs a pad token")

    def audio(self, value) -> np.ndarray:
        if isinstance(value, (str, os.PathLike)):
            return np.asarray(self.load_audio(_resolve(str(value), self.audio_root)), dtype=np.float32)
        if isinstance(value, Mapping):  # a datasets.Audio cell: decoded {"array", "sampling_rate"} or raw {"bytes", "path"}
            if value.get("array") is None:
                if value.get("bytes"):
                    import io

                    return load_audio_file(io.BytesIO(value["bytes"]), self.sample_rate)
                return self.audio(value["path"])
            samples, sr = np.asarray(value["array"], dtype=np.float32), int(value.get("sampling_rate") or self.sample_rate)
            if sr != self.sample_rate:
                import soxr

                samples = soxr.resample(samples, sr, self.sample_rate, quality="HQ").astype(np.float32)
            return samples
        samples = np.asarray(value, dtype=np.float32)
        if samples.ndim != 1:
            raise ValueError(f"audio arrays must be mono 1-D at {self.sample_rate} Hz, got shape {samples.shape}")
        return samples

    def __call__(self, examples: list[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        prompts = [prompt_text(self.processor, ex["prompt"]) for ex in examples]
        chosen_audio = [self.audio(ex["audio"]) for ex in examples]
        rejected_audio = [
            self.audio(ex["rejected_audio"]) if ex.get("rejected_audio") is not None else clip
            for ex, clip in zip(examples, chosen_audio)
        ]
        completions = [ex["chosen"] for ex in examples] + [ex["rejected"] for ex in examples]
        return self.encode(prompts + prompts, chosen_audio + rejected_audio, completions)

    def encode(self, prompts: list[str], clips: list[np.ndarray], completions: list[str]) -> dict[str, torch.Tensor]:
        """Rows of prompt (with its own clip) + completion, right-padded, with the completion's mask."""
        tokenizer = self.processor.tokenizer
        # One processor call for all rows: it expands each <|AUDIO|> to its own clip's token count.
        encoded = self.processor(
            text=prompts,
            audio=clips,
            sampling_rate=self.sample_rate,
            return_tensors="pt",
            padding=True,
        )
        completion_ids = tokenizer([c + self._end for c in completions], add_special_tokens=False)["input_ids"]

        rows, masks = [], []
        for ids, attention, completion in zip(encoded["input_ids"], encoded["attention_mask"], completion_ids):
            prompt_ids = ids[attention.bool()].tolist()  # works for either padding side
            if self.max_completion_tokens is not None:
                completion = completion[: self.max_completion_tokens]
            rows.append(prompt_ids + list(completion))
            masks.append([0] * len(prompt_ids) + [1] * len(completion))
        width = max(len(r) for r in rows)
        pad = tokenizer.pad_token_id
        batch = {
            "input_ids": torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=torch.long),
            "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], dtype=torch.long),
            "completion_mask": torch.tensor([m + [0] * (width - len(m)) for m in masks], dtype=torch.long),
        }
        skip = {"input_ids", "attention_mask", *getattr(self.processor, "unused_input_names", ()), "num_audio_tokens"}
        for key, value in encoded.items():
            if key in skip or not torch.is_tensor(value):
                continue
            if self.feature_dtype is not None and value.is_floating_point():
                value = value.to(self.feature_dtype)
            batch[key] = value
        return batch


@dataclass
class AudioSFTCollator(AudioPreferenceCollator):
    """Supervised batches for LISTEN from the same columns: ``prompt``, ``audio`` and the answer in ``chosen``;
    ``labels`` are the answer's tokens (and its turn end), everything else ``-100``."""

    def __call__(self, examples: list[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.encode([prompt_text(self.processor, ex["prompt"]) for ex in examples],
                            [self.audio(ex["audio"]) for ex in examples], [ex["chosen"] for ex in examples])
        mask = batch.pop("completion_mask").bool()
        batch["labels"] = batch["input_ids"].masked_fill(~mask, -100)
        return batch
