"""Audio contrast of a generated answer, for the transformers engine.

``answer_logprob`` is read from ``generate``'s own per-step logits (no extra pass); ``blank_logprob``
from one teacher-forced forward over the same token sequence with the audio replaced by blank
audio (zeros of the same length, so the prompt and its audio-token count are unchanged). The
difference says how much the answer depends on what was heard: an answer as likely on silence
as on the clip is the model's prior, not a hearing.

Answers read as 'no' claim no sound and get no blank pass (their log-probs stay None).
The answer's tokens are scored up to and including the stop token the model emitted, so "Yes"
is scored as the complete answer "Yes", not as a prefix of "Yes, but…".
"""

from __future__ import annotations

import numpy as np
import torch

from serving.answers import classify
from serving.backends.base import AudioPrompt, Generation


def _blank_features(backend, inputs, prompts: list[AudioPrompt]) -> torch.Tensor:
    """Log-mel of all-zero audio, shaped like the batch's features.

    Whisper-style features of digital silence are one constant; it is computed once per backend
    (from real zeros through the real extractor), and checked to be constant, else recomputed per clip.
    """
    feats = inputs["input_features"]
    value = getattr(backend, "_blank_value", None)
    if value is None:
        extractor = backend.processor.feature_extractor
        probe = extractor(np.zeros(backend.sample_rate, dtype=np.float32), sampling_rate=backend.sample_rate, return_tensors="pt")["input_features"]
        value = float(probe.flatten()[0]) if bool((probe == probe.flatten()[0]).all()) else float("nan")
        backend._blank_value = value
    if value == value:  # not NaN: silence is one constant
        return torch.full_like(feats, value)
    extractor = backend.processor.feature_extractor
    zeros = [np.zeros(len(p.samples), dtype=np.float32) for p in prompts]
    blank = extractor(zeros, sampling_rate=backend.sample_rate, return_tensors="pt", padding="max_length")["input_features"]
    return blank.to(feats.device, feats.dtype)


@torch.inference_mode()
def with_audio_contrast(backend, inputs, new_tokens: torch.Tensor, step_logits, generations: list[Generation], prompts: list[AudioPrompt]) -> list[Generation]:
    # an answer that claims nothing heard ("No") has nothing for the contrast to weigh: skip its blank pass
    rows = [i for i, p in enumerate(prompts) if p.contrast and classify(generations[i].text) != "no"]
    if not rows or new_tokens.shape[1] == 0:
        return generations
    steps = min(new_tokens.shape[1], len(step_logits))
    # answer length scored: its tokens plus the stop token when one was emitted (within the prompt's limit)
    lengths = []
    for i in rows:
        g, limit = generations[i], prompts[i].max_new_tokens
        lengths.append(max(1, min(g.num_tokens + 1, limit, steps)))
    span = max(lengths)
    tokens = new_tokens[rows, :span]
    real_lp = torch.stack([step_logits[t][rows].float() for t in range(span)], dim=1).log_softmax(-1)
    real_tok = real_lp.gather(-1, tokens[..., None]).squeeze(-1)  # [R, span]

    ids = inputs["input_ids"][rows]
    prompt_mask = inputs["attention_mask"][rows]
    answer_mask = (torch.arange(span, device=ids.device)[None, :] < torch.tensor(lengths, device=ids.device)[:, None]).to(prompt_mask.dtype)
    seq = torch.cat([ids, tokens], dim=1)
    mask = torch.cat([prompt_mask, answer_mask], dim=1)
    position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
    blank = _blank_features(backend, inputs, prompts)[rows]
    model = backend.model.get_base_model() if hasattr(backend.model, "get_base_model") else backend.model  # LoRA stays active
    feature_mask = inputs["feature_attention_mask"][rows]
    hidden = _blank_hidden(backend, model, seq, mask, position_ids, blank, feature_mask)
    # only the positions that predict the answer tokens go through the LM head (a 150k vocabulary is costly)
    logits = model.lm_head(hidden[:, -(span + 1) : -1]).float().log_softmax(-1)
    blank_tok = logits.gather(-1, tokens[..., None]).squeeze(-1)

    result = list(generations)
    for k, (i, n) in enumerate(zip(rows, lengths)):
        g = generations[i]
        result[i] = Generation(g.text, g.num_tokens, answer_logprob=float(real_tok[k, :n].sum()), blank_logprob=float(blank_tok[k, :n].sum()))
    return result


def _blank_hidden(backend, model, seq, mask, position_ids, blank, feature_mask) -> torch.Tensor:
    """Last hidden states of the blank-audio pass.

    Blank audio's encoding depends only on its length, so the projected audio embeddings are
    cached per (feature frames, valid frames); on a hit only the language model runs.
    """
    from collections import OrderedDict

    inner = model.model
    audio_id = model.config.audio_token_id
    cache = backend.__dict__.setdefault("_blank_audio_cache", OrderedDict())
    keys = [(int(blank.shape[-1]), int(feature_mask[k].sum())) for k in range(len(seq))]
    if all(k in cache for k in keys):
        embeds = inner.get_input_embeddings()(seq)
        audio = torch.cat([cache[k] for k in keys]).to(embeds.device, embeds.dtype)
        embeds = embeds.masked_scatter((seq == audio_id)[..., None], audio)
        return inner.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids, use_cache=False).last_hidden_state
    captured = {}
    hook = inner.multi_modal_projector.register_forward_hook(lambda _m, _i, out: captured.setdefault("audio", out))
    try:
        hidden = inner(input_ids=seq, attention_mask=mask, position_ids=position_ids, input_features=blank,
                       feature_attention_mask=feature_mask, use_cache=False).last_hidden_state
    finally:
        hook.remove()
    if "audio" in captured:
        for k, key in enumerate(keys):
            n = int((seq[k] == audio_id).sum())
            cache[key] = captured["audio"][k, :n].detach().clone()
            cache.move_to_end(key)
        while len(cache) > 64:
            cache.popitem(last=False)
    return hidden
