"""Token ids and labels for chats about one clip, laid out exactly as the chat template renders them.

Training packs several independent questions about the same scene into one multi-turn chat, so
the audio is encoded once for all of them; only answer tokens (and their ``<|im_end|>``) carry loss.
The first turn is byte-for-byte the single-turn prompt that serving builds.
"""

from __future__ import annotations

from dataclasses import dataclass

from models.tiny import AUDIO, AUDIO_BOS, AUDIO_EOS, IM_END, IM_START

IGNORE = -100


@dataclass(frozen=True)
class Turn:
    question: str
    answer: str


def audio_tokens_for_frames(frames: int) -> int:
    """Audio placeholders the Qwen2-Audio encoder yields for ``frames`` mel frames (conv stride 2, pool 2)."""
    return ((frames - 1) // 2 + 1 - 2) // 2 + 1


def encode_chat(tokenizer, turns: list[Turn], n_audio: int) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` for a chat whose first user turn carries the audio."""
    ids: list[int] = []
    labels: list[int] = []

    def add(text: str, learn: bool) -> None:
        piece = tokenizer.encode(text, add_special_tokens=False)
        ids.extend(piece)
        labels.extend(piece if learn else [IGNORE] * len(piece))

    audio_id = tokenizer.convert_tokens_to_ids(AUDIO)
    for i, turn in enumerate(turns):
        if i == 0:
            add(f"{IM_START}user\n{AUDIO_BOS}", False)
            ids.extend([audio_id] * n_audio)
            labels.extend([IGNORE] * n_audio)
            add(f"{AUDIO_EOS}\n{turn.question}{IM_END}\n{IM_START}assistant\n", False)
        else:
            add(f"{IM_START}user\n{turn.question}{IM_END}\n{IM_START}assistant\n", False)
        add(f"{turn.answer}{IM_END}", True)
        add("\n", False)
    return ids, labels


def prompt_ids(tokenizer, question: str, n_audio: int) -> list[int]:
    """The generation prompt for one question (what serving sends), as ids."""
    ids, _ = encode_chat(tokenizer, [Turn(question, "")], n_audio)
    cut = len(ids) - len(tokenizer.encode(f"{IM_END}\n", add_special_tokens=False))
    return ids[:cut]
