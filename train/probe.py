"""How much the audio tokens know: a linear probe on the model's audio encoder.

The language model can only answer "is there X?" as well as its audio tokens separate present
from absent X. This fits one linear sound-event-detection head on the frozen encoder's outputs
(the tensor the projector reads) over the train split, then scores every presence question of
each split by the head's clip-level logit for the asked-about class, and reports ROC-AUC per
negative sampling. Train vs test shows how far the audio side generalises to unseen recordings;
either against the model's own presence accuracy shows how much of what is heard the language
model reads. ``earwitness train probe --model DIR --corpus DIR`` prints the table.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from train.data.qa import NEGATIVE_SAMPLINGS as SAMPLINGS
from train.verifier import roc_auc



@torch.no_grad()
def encoder_outputs(model, features: np.ndarray, batch_size: int = 64) -> torch.Tensor:
    tower = model.model.audio_tower.eval()
    chunks = [tower(torch.from_numpy(np.asarray(features[i : i + batch_size], dtype=np.float32))).last_hidden_state
              for i in range(0, len(features), batch_size)]
    return torch.cat(chunks)


def fit_head(hidden: torch.Tensor, targets: torch.Tensor, steps: int = 300, lr: float = 1e-2, seed: int = 0) -> torch.nn.Linear:
    """Full-batch Adam on frame and clip (max over frames) detection losses, as stage 0 trains."""
    torch.manual_seed(seed)
    head = torch.nn.Linear(hidden.shape[-1], targets.shape[-1])
    optimizer = torch.optim.Adam(head.parameters(), lr=lr)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    for _ in range(steps):
        logits = head(hidden)
        loss = bce(logits, targets) + bce(logits.max(1).values, targets.max(1).values)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return head


def presence_auc(clip_logits: np.ndarray, rows_of: dict[str, int], classes: list[str], qa_rows) -> dict[str, float]:
    """ROC-AUC of the asked-about class's clip logit: positives against each negative sampling."""
    index = {name: i for i, name in enumerate(classes)}
    asked = [r for r in qa_rows if r.kind == "presence" and r.scene_id in rows_of]
    score = {id(r): float(clip_logits[rows_of[r.scene_id], index[r.label]]) for r in asked}
    out = {}
    for sampling in SAMPLINGS:
        sel = [r for r in asked if r.sampling in ("positive", sampling)]
        if sel and any(r.sampling == sampling for r in sel):
            out[sampling] = roc_auc(np.array([r.sampling == "positive" for r in sel]), np.array([score[id(r)] for r in sel]))
    return out


def encoded_split(model, processor, corpus_dir: Path, split: str, classes: list[str]) -> tuple[torch.Tensor, dict[str, int], torch.Tensor]:
    """``(audio tokens [N, P, dim], scene_id → row, strong-label activity [N, P, classes])`` of one split."""
    from models.tiny import TinySize
    from train.encoder import frame_targets
    from train.features import feature_tag, scene_features

    size = TinySize(**model.config.earwitness_tiny_size)
    features, rows_of, _ = scene_features(corpus_dir, split, processor.feature_extractor, feature_tag(size), progress=False)
    hidden = encoder_outputs(model, features)
    timelines = json.loads((corpus_dir / "scenes" / split / "timelines.json").read_text())
    return hidden, rows_of, torch.from_numpy(frame_targets(timelines, rows_of, classes, hidden.shape[1], float(size.chunk_s)))


def probe(model_dir: str | Path, corpus_dir: str | Path, splits: tuple[str, ...] = ("train", "test"), steps: int = 300) -> dict[str, dict[str, float]]:
    """Presence ROC-AUC per split and negative sampling, from a linear head on the frozen encoder."""
    from models.loading import load
    from models.registry import resolve
    from train.data.ontology import load_ontology
    from train.data.qa import read_qa_rows

    corpus_dir = Path(corpus_dir)
    processor, model = load(resolve(str(model_dir)), device="cpu")
    classes = load_ontology(corpus_dir / "ontology.json").names
    data = {split: encoded_split(model, processor, corpus_dir, split, classes) for split in dict.fromkeys(("train", *splits))}
    head = fit_head(data["train"][0], data["train"][2], steps=steps)
    results = {}
    with torch.no_grad():
        for split in splits:
            hidden, rows_of, _ = data[split]
            results[split] = presence_auc(head(hidden).max(1).values.numpy(), rows_of, classes, read_qa_rows(corpus_dir, split))
    return results


def table(results: dict[str, dict[str, float]]) -> str:
    lines = ["| split | " + " | ".join(f"ROC-AUC vs {s}" for s in SAMPLINGS) + " |", "| --- |" + " --- |" * len(SAMPLINGS)]
    for split, aucs in results.items():
        lines.append(f"| {split} | " + " | ".join(f"{aucs[s]:.3f}" if s in aucs else "–" for s in SAMPLINGS) + " |")
    return "\n".join(lines)
