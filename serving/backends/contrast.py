"""Audio contrast of a generated answer, for the transformers engine: its log-probability given the
clip against given blank audio.

The real answer's log-probability comes out of the decode itself (its logits). The blank side is
the same prompt with the audio replaced by silence of the same length, teacher-forced on the
answer's tokens. Everything in that prompt up to the end of the audio is the same for every
question about a clip of that length, so its key–value cache is computed once and kept
(:func:`blank_prefixes`); a contrast then costs one forward pass over the question and answer
tokens only, and none when the same question got the same answer on a clip of that length before
(:func:`blank_scores`). Answers read as 'no' claim no sound and get no contrast (their log-probs stay None):
nothing is computed for them. An answer as likely on silence as on the clip is the model's prior,
not a hearing.

The answer's tokens are scored up to and including the stop token the model emitted, so "Yes"
is scored as the complete answer "Yes", not as a prefix of "Yes, but…".
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from transformers import DynamicCache

from models.tiny import AUDIO_EOS
from models.answers import classify
from serving.backends.base import AudioPrompt, Generation
from models.lru import LruCache


def blank_value(backend) -> float | None:
    """Whisper-style log-mel of digital silence is one constant: computed once through the real extractor."""
    if not hasattr(backend, "_blank_value"):
        extractor = backend.processor.feature_extractor
        probe = extractor(np.zeros(backend.sample_rate, dtype=np.float32), sampling_rate=backend.sample_rate, return_tensors="pt")["input_features"]
        constant = bool((probe == probe.flatten()[0]).all())
        backend._blank_value = float(probe.flatten()[0]) if constant else None
    return backend._blank_value


def blank_prefixes(backend) -> LruCache:
    """Key–value caches of prompt prefixes that end with blank audio (tensors: few are kept)."""
    if not hasattr(backend, "_blank_prefixes"):
        backend._blank_prefixes = LruCache(32)
    return backend._blank_prefixes


def blank_scores(backend) -> LruCache:
    """Finished blank-side log-probs. Silence of a given length is always the same silence, so the blank
    side of a contrast depends on the clip's length, the question and the answer only: assistants that
    ask the same questions of fixed-length windows get it without a model pass."""
    if not hasattr(backend, "_blank_scores"):
        backend._blank_scores = LruCache(4096)
    return backend._blank_scores


def clear_blank_caches(backend) -> None:
    """After an adapter switch under the backend (``serving.adapters.PeftAdapters`` calls it); the vLLM
    backend keys its scores by adapter instead."""
    blank_prefixes(backend).clear()
    blank_scores(backend).clear()


def _blank_features(backend, inputs, row: int, n_samples: int) -> torch.Tensor:
    feats = inputs["input_features"][row : row + 1]
    value = blank_value(backend)
    if value is not None:
        return torch.full_like(feats, value)
    extractor = backend.processor.feature_extractor
    blank = extractor([np.zeros(n_samples, dtype=np.float32)], sampling_rate=backend.sample_rate, return_tensors="pt", padding="max_length")
    return blank["input_features"].to(feats.device, feats.dtype)


def blank_logprob(backend, inputs, row: int, n_samples: int, answer: torch.Tensor) -> float:
    """log P(answer | the row's prompt with blank audio), from the cached blank prefix plus one pass."""
    model, tokenizer = backend.model, backend.processor.tokenizer
    ids = inputs["input_ids"][row][inputs["attention_mask"][row].bool()]
    frames = int(inputs["feature_attention_mask"][row].sum())  # the silence's length, as the encoder sees it
    score_key = (frames, tuple(ids.tolist()), tuple(answer.tolist()))
    score = blank_scores(backend).get(score_key)
    if score is not None:
        return score
    eos_id = tokenizer.convert_tokens_to_ids(AUDIO_EOS)
    eos = (ids == eos_id).nonzero() if eos_id is not None and eos_id != tokenizer.unk_token_id else ids[:0]
    cut = int(eos[-1] if len(eos) else (ids == model.config.audio_token_id).nonzero()[-1]) + 1  # just past the audio
    key = (frames, *ids[:cut].tolist())
    prefix = blank_prefixes(backend).get(key)
    if prefix is None:
        out = model(input_ids=ids[None, :cut], attention_mask=torch.ones_like(ids[None, :cut]),
                    input_features=_blank_features(backend, inputs, row, n_samples),
                    feature_attention_mask=inputs["feature_attention_mask"][row : row + 1], use_cache=True)
        prefix = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
        blank_prefixes(backend).put(key, prefix)
    cache = DynamicCache()  # a fresh cache over the stored tensors: the pass below appends to it, never to them
    for layer, (k, v) in enumerate(prefix):
        cache.update(k, v, layer)
    tail = torch.cat([ids[cut:], answer.to(ids.device)])[None]
    logits = model(input_ids=tail, attention_mask=torch.ones((1, cut + tail.shape[1]), dtype=ids.dtype, device=ids.device),
                   past_key_values=cache, use_cache=True).logits[0]
    start = len(ids) - cut - 1  # the logits that predict the answer's first token
    lp = logits[start : start + len(answer)].float().log_softmax(-1)
    score = float(lp.gather(-1, answer[:, None].to(lp.device)).sum())
    blank_scores(backend).put(score_key, score)
    return score


def with_contrast(backend, inputs, prompts: list[AudioPrompt], generations: list[Generation], new_tokens: torch.Tensor,
                  logits: tuple[torch.Tensor, ...]) -> list[Generation]:
    """``generations`` with the real and blank log-probs of each contrast row's answer (unless it is a 'no')."""
    result = list(generations)
    for i, (p, g) in enumerate(zip(prompts, generations)):
        if not p.contrast or classify(g.text) == "no":
            continue
        n = max(1, min(g.num_tokens + 1, p.max_new_tokens, len(logits)))
        answer = new_tokens[i, :n]
        steps = torch.stack([step[i] for step in logits[:n]]).float().log_softmax(-1)
        real = float(steps.gather(-1, answer[:, None].to(steps.device)).sum())
        blank = blank_logprob(backend, inputs, i, len(p.samples), answer)
        result[i] = dataclasses.replace(g, answer_logprob=real, blank_logprob=blank)
    return result
