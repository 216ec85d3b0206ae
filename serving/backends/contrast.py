"""Audio contrast of a generated answer, for the transformers engine, in the same batched decode.

Every row that asks for the contrast gets a twin in the generate batch: the same prompt with the
audio replaced by blank audio (zeros of the same length, so the prompt and its audio-token count
are unchanged). A logits processor keeps each twin in lockstep with its real row — at every step
the twin is forced to the token the real row picks — and records both rows' log-probabilities
of that token. So ``answer_logprob`` (real audio) and ``blank_logprob`` (blank audio) come out of
one decoding loop with one KV cache, no second pass: on a CPU the twin costs a wider batch, not
another request's worth of latency; and since silence encodes the same every time, the twin's audio
encoding is computed once per clip length (:class:`BlankEncodings`), not per request. An answer
as likely on silence as on the clip is the model's prior, not a hearing.

Answers read as 'no' claim no sound: their log-probs are left None (nothing for the guard to weigh).
The answer's tokens are scored up to and including the stop token the model emitted, so "Yes"
is scored as the complete answer "Yes", not as a prefix of "Yes, but…".
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import LogitsProcessor

from serving.answers import classify
from serving.backends.base import AudioPrompt, Generation


def blank_value(backend) -> float | None:
    """Whisper-style log-mel of digital silence is one constant: computed once through the real extractor."""
    if not hasattr(backend, "_blank_value"):
        extractor = backend.processor.feature_extractor
        probe = extractor(np.zeros(backend.sample_rate, dtype=np.float32), sampling_rate=backend.sample_rate, return_tensors="pt")["input_features"]
        constant = bool((probe == probe.flatten()[0]).all())
        backend._blank_value = float(probe.flatten()[0]) if constant else None
    return backend._blank_value


class BlankEncodings:
    """Silence encodes the same every time: the twins' audio-tower output, computed once per length.

    Wraps the audio tower's ``forward`` on one model instance. Rows whose log-mel is the blank
    constant take their encoding from a small cache keyed by (frames, attention-mask row); the
    rest go through the tower as before. Only in eval mode (no dropout), so outputs are the same.
    """

    def __init__(self, tower, value: float, size: int = 16):
        self.tower, self.value, self.size = tower, value, size
        self.cache: dict[tuple, torch.Tensor] = {}
        self.hits = 0
        self._forward = tower.forward
        tower.forward = self

    def __call__(self, input_features: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        if self.tower.training or input_features.dim() != 3:
            return self._forward(input_features, attention_mask=attention_mask, **kwargs)
        blank = (input_features == self.value).flatten(1).all(-1)
        if not bool(blank.any()) or bool(blank.all()):
            return self._forward(input_features, attention_mask=attention_mask, **kwargs)
        real = ~blank
        out = self._forward(input_features[real], attention_mask=None if attention_mask is None else attention_mask[real], **kwargs)
        hidden = out.last_hidden_state.new_empty((len(input_features), *out.last_hidden_state.shape[1:]))
        hidden[real] = out.last_hidden_state
        for i in torch.nonzero(blank).flatten().tolist():
            hidden[i] = self._blank(input_features[i : i + 1], None if attention_mask is None else attention_mask[i : i + 1], kwargs)
        out.last_hidden_state = hidden
        return out

    def _blank(self, features: torch.Tensor, mask: torch.Tensor | None, kwargs: dict) -> torch.Tensor:
        key = (features.shape[-1], None if mask is None else int((mask == 0).sum()))
        if key in self.cache:
            self.hits += 1
            return self.cache[key]
        if len(self.cache) >= self.size:
            self.cache.pop(next(iter(self.cache)))
        self.cache[key] = self._forward(features, attention_mask=mask, **kwargs).last_hidden_state[0]
        return self.cache[key]


def blank_encodings(backend) -> BlankEncodings | None:
    """The memo on ``backend``'s audio tower (installed on first use); None where blank audio is not one constant."""
    if not hasattr(backend, "_blank_encodings"):
        value = blank_value(backend)
        tower = next((m for name, m in backend.model.named_modules() if name.endswith("audio_tower")), None)
        backend._blank_encodings = BlankEncodings(tower, value) if value is not None and tower is not None else None
    return backend._blank_encodings


def with_blank_twins(backend, inputs, prompts: list[AudioPrompt]) -> tuple[dict, list[int]]:
    """The batch plus one blank-audio twin per contrast row (appended after the real rows)."""
    rows = [i for i, p in enumerate(prompts) if p.contrast]
    value = blank_value(backend)
    blank_encodings(backend)
    feats = inputs["input_features"][rows]
    if value is not None:
        blank = torch.full_like(feats, value)
    else:
        extractor = backend.processor.feature_extractor
        zeros = [np.zeros(len(prompts[i].samples), dtype=np.float32) for i in rows]
        blank = extractor(zeros, sampling_rate=backend.sample_rate, return_tensors="pt", padding="max_length")["input_features"]
        blank = blank.to(feats.device, feats.dtype)
    doubled = dict(inputs)
    for key in ("input_ids", "attention_mask", "feature_attention_mask"):
        doubled[key] = torch.cat([inputs[key], inputs[key][rows]])
    doubled["input_features"] = torch.cat([inputs["input_features"], blank])
    return doubled, rows


class Lockstep(LogitsProcessor):
    """Forces twin ``n + k`` to follow real row ``rows[k]`` token by token, recording both log-probs."""

    def __init__(self, n_real: int, rows: list[int]):
        self.n_real, self.rows = n_real, rows
        self.real: list[torch.Tensor] = []
        self.blank: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        real = scores[self.rows].float().log_softmax(-1)
        chosen = real.argmax(-1, keepdim=True)  # greedy: the token the real row is about to take
        twins = scores[self.n_real :].float().log_softmax(-1)
        self.real.append(real.gather(-1, chosen).squeeze(-1))
        self.blank.append(twins.gather(-1, chosen).squeeze(-1))
        forced = torch.full_like(scores[self.n_real :], torch.finfo(scores.dtype).min)
        forced.scatter_(-1, chosen, 0.0)
        scores = scores.clone()
        scores[self.n_real :] = forced
        return scores

    def contrasted(self, generations: list[Generation], prompts: list[AudioPrompt]) -> list[Generation]:
        """``generations`` with the log-probs of each contrast row's answer (its tokens and its stop token)."""
        if not self.real:
            return generations
        real, blank = torch.stack(self.real, dim=1), torch.stack(self.blank, dim=1)  # [rows, steps]
        result = list(generations)
        for k, i in enumerate(self.rows):
            g = generations[i]
            if classify(g.text) == "no":
                continue
            n = max(1, min(g.num_tokens + 1, prompts[i].max_new_tokens, real.shape[1]))
            result[i] = Generation(g.text, g.num_tokens, answer_logprob=float(real[k, :n].sum()), blank_logprob=float(blank[k, :n].sum()))
        return result
