"""Sound-event heads on frozen audio features, and what a checkpoint's own audio tower knows scored by one.

``fit_probe`` fits a head (``POOLINGS``) on a :class:`train.frozen_features.ProbeData`; ``probe`` fits the ``frame``
head on a checkpoint's tower outputs and reports presence ROC-AUC per split (the recipe's and model card's figure).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from models.loading import load
from models.registry import resolve
from train.data.ontology import load_ontology
from train.data.qa import NEGATIVE_SAMPLINGS as SAMPLINGS, read_qa_rows
from train.frozen_features import ProbeData, encoded_split
from train.metrics import presence_auc

POOLINGS = ("meanmax", "attention", "frame")

class ProbeHead(torch.nn.Module):
    """A sound-event head on standardised frozen features; ``forward`` gives (clip logits, frame logits or None)."""

    def __init__(self, dim: int, classes: int, pooling: str, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}")
        self.pooling = pooling
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.drop = torch.nn.Dropout(0.2)
        self.cla = torch.nn.Linear(2 * dim if pooling == "meanmax" else dim, classes)
        self.att = torch.nn.Linear(dim, classes) if pooling == "attention" else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = self.drop((x.float() - self.mean) / self.std)
        if self.pooling == "meanmax":
            return self.cla(torch.cat([x.mean(1), x.amax(1)], dim=-1)), None
        frame = self.cla(x)
        if self.pooling == "attention":
            weights = torch.softmax(self.att(x), dim=1)
            return (weights * frame).sum(1), frame
        return frame.amax(1), frame


def fit_probe(data: ProbeData, pooling: str, keep: np.ndarray | None = None, epochs: int = 12, batch_size: int = 128,
              lr: float = 2e-3, weight_decay: float = 1e-2, seed: int = 0) -> ProbeHead:
    """Minibatch AdamW on clip-level BCE (and, for ``frame``, frame-level BCE on the strong labels)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    idx = np.flatnonzero(keep) if keep is not None else np.arange(len(data.features))
    sample = data.features[rng.choice(idx, size=min(len(idx), 512), replace=False)].astype(np.float32)
    mean = torch.from_numpy(sample.reshape(-1, sample.shape[-1]).mean(0))
    std = torch.from_numpy(sample.reshape(-1, sample.shape[-1]).std(0) + 1e-3)
    head = ProbeHead(data.features.shape[-1], data.targets.shape[-1], pooling, mean, std)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    steps = epochs * math.ceil(len(idx) / batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    head.train()
    for _ in range(epochs):
        for batch in np.array_split(rng.permutation(idx), math.ceil(len(idx) / batch_size)):
            batch = np.sort(batch)
            x = torch.from_numpy(np.asarray(data.features[batch]))
            y = torch.from_numpy(data.targets[batch])
            clip, frame = head(x)
            loss = bce(clip, y.amax(1))
            if pooling == "frame":
                loss = loss + bce(frame, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return head.eval()


@torch.no_grad()
def clip_logits(head: ProbeHead, features: np.ndarray, batch_size: int = 256) -> np.ndarray:
    return np.concatenate([head(torch.from_numpy(np.asarray(features[i:i + batch_size])))[0].numpy()
                           for i in range(0, len(features), batch_size)])


def probe(model_dir: str | Path, corpus_dir: str | Path, splits: tuple[str, ...] = ("train", "test"), epochs: int = 12) -> dict[str, dict[str, float]]:
    """Presence ROC-AUC per split and negative sampling of a checkpoint's own audio tower (``frame`` head)."""

    corpus_dir = Path(corpus_dir)
    processor, model = load(resolve(str(model_dir)), device="cpu")
    classes = load_ontology(corpus_dir / "ontology.json").names
    data = {}
    for split in dict.fromkeys(("train", *splits)):
        hidden, rows, active = encoded_split(model_dir, model, processor, corpus_dir, split, classes)
        data[split] = ProbeData(hidden.numpy().astype(np.float16), active.numpy(), rows, [], [])
    head = fit_probe(data["train"], "frame", epochs=epochs)
    return {split: presence_auc(clip_logits(head, data[split].features), data[split].rows, classes, read_qa_rows(corpus_dir, split))
            for split in splits}


def table(results: dict[str, dict[str, float]]) -> str:
    """Markdown of :func:`probe`: one row per split."""
    lines = ["| split | " + " | ".join(f"ROC-AUC vs {s}" for s in SAMPLINGS) + " |", "| --- |" + " --- |" * len(SAMPLINGS)]
    for split, aucs in results.items():
        lines.append(f"| {split} | " + " | ".join(f"{aucs[s]:.3f}" if s in aucs else "–" for s in SAMPLINGS) + " |")
    return "\n".join(lines)
