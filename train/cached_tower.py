"""Supervised stages on cached audio-tower outputs: the frozen Whisper tower never runs in training.

``train.features.encoder_features`` stores the tower's output (the tensor Qwen2-Audio's projector
reads) once per scene. :class:`EncodedForward` runs Qwen2-Audio's forward from there on — projector,
the audio tokens' embeddings replaced by the projected frames, the language model — and scores only
answer tokens through the LM head (49 k logits for every audio position would cost more than the
layers). It is the same computation as the served model's, minus the frozen tower.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from models.families import unwrap
from train.data.conversations import IGNORE, Turn, encode_chat
from train.sft import pad_chats


def collate_encoded(tokenizer, features: np.ndarray, rows_of: dict[str, int], frames: np.ndarray, batch: list[tuple[str, list[Turn]]]) -> dict:
    """A right-padded batch of chats with each scene's cached tower output (``frames`` is unused)."""
    idx = [rows_of[scene_id] for scene_id, _ in batch]
    text = pad_chats(tokenizer, [encode_chat(tokenizer, turns, features.shape[1]) for _, turns in batch])
    return {**text, "audio_features": torch.from_numpy(np.asarray(features[idx], dtype=np.float32))}


class EncodedForward(torch.nn.Module):
    """``Qwen2AudioForConditionalGeneration`` (or its PEFT wrapper) fed tower outputs instead of mels."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, labels, audio_features):
        qa = unwrap(self.model)
        lm = qa.model.language_model
        embeds = lm.embed_tokens(input_ids)
        audio = qa.model.multi_modal_projector(audio_features).to(embeds.dtype)
        slots = (input_ids == qa.config.audio_token_id).unsqueeze(-1)
        embeds = embeds.masked_scatter(slots, audio)
        hidden = lm(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state
        target = labels[:, 1:]
        keep = target != IGNORE
        logits = qa.lm_head(hidden[:, :-1][keep])
        loss = torch.nn.functional.cross_entropy(logits.float(), target[keep])
        return SimpleNamespace(loss=loss)
