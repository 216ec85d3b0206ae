"""The lookup stage's parts: a class's written name in the language model's own word space, and audio tokens made of them.

earwitness-small's lookup stage (``train.small_recipe``) teaches the language model to find a question's words among
its audio tokens on oracle tokens first: at each position the mean input embedding of the phrase words of the classes
the strong labels say sound there. The binding diagnostic (``train.binding``) measures the same lookup.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from train.data.formats import read_timelines
from train.data.qa import read_qa_rows
from train.data.targets import frame_targets

FILLER = {"a", "an", "the", "of", "or", "and", "someone", "something"}


@dataclass(frozen=True)
class Split:
    hidden: torch.Tensor  # [N, P, audio_dim]: the frozen audio tower's outputs
    active: torch.Tensor  # [N, P, classes]: strong-label activity per audio-token position
    rows_of: dict[str, int]
    questions: list  # presence QARows of the split


def phrase_word_ids(ontology, tokenizer) -> list[list[int]]:
    """Token ids of each class's canonical phrase, filler words dropped: what an oracle token says."""
    out = []
    for c in ontology:
        words = [w for w in c.phrases[0].split() if w.lower() not in FILLER] or c.phrases[0].split()
        out.append([t for w in words for t in tokenizer.encode(" " + w, add_special_tokens=False)])
    return out


def name_embeddings(embed: torch.Tensor, word_ids: list[list[int]]) -> torch.Tensor:
    """``[C, D]``: each class's phrase words' mean input embedding."""
    return torch.stack([embed[ids].mean(0) for ids in word_ids])


def mix_names(active: torch.Tensor, names: torch.Tensor) -> torch.Tensor:
    """``[B, P, D]``: each position the mean of its active classes' ``names`` (zero if none)."""
    return active @ names / active.sum(-1, keepdim=True).clamp(min=1)


def oracle_tokens(embed: torch.Tensor, word_ids: list[list[int]], active: torch.Tensor) -> torch.Tensor:
    """``[B, P, D]``: each position the mean embedding of its active classes' phrase words (zero if none)."""
    return mix_names(active, name_embeddings(embed, word_ids))


def pool_positions(hidden: torch.Tensor, active: torch.Tensor, positions: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fewer, coarser audio tokens (mean of the tower's, union of the labels'): a cheaper cell, same lookup."""
    if positions is None or positions == hidden.shape[1]:
        return hidden, active
    if hidden.shape[1] % positions:
        raise ValueError(f"positions must divide {hidden.shape[1]}")
    n, p, _ = hidden.shape
    return hidden.reshape(n, positions, p // positions, -1).mean(2), active.reshape(n, positions, p // positions, -1).amax(2)


def oracle_split(corpus_dir: Path, split: str, classes: list[str], positions: int, window_s: float) -> Split:
    """A split for oracle tokens only: the strong labels at ``positions`` steps, no audio tower run."""

    timelines = read_timelines(corpus_dir, split)
    rows_of = {scene_id: i for i, scene_id in enumerate(timelines)}
    active = torch.from_numpy(frame_targets(timelines, rows_of, classes, positions, window_s))
    questions = [r for r in read_qa_rows(corpus_dir, split) if r.kind == "presence" and r.scene_id in rows_of]
    return Split(torch.zeros(len(rows_of), positions, 0), active, rows_of, questions)
