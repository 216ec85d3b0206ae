"""Stage 0: teach the audio encoder what sounds when, before any language model reads it.

A small from-scratch encoder learns slowly through a language model's loss alone (it collapses to
the answer prior). The corpus has strong labels, so the encoder first learns sound-event
detection: for every output position (a 160 ms audio token) a multi-label target of the classes
active then (foreground events by onset/offset, the background bed throughout). The language model
then starts from audio tokens that already say what is there and when — the role Whisper's
pretraining plays for the real Qwen2-Audio.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from train.sft import plot_losses


class DetectionHead(torch.nn.Module):
    def __init__(self, dim: int, classes: int):
        super().__init__()
        self.proj = torch.nn.Linear(dim, classes)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden)


def pretrain_encoder(
    model,
    features: np.ndarray,
    targets: np.ndarray,
    out_dir: Path,
    val: tuple[np.ndarray, np.ndarray] | None = None,
    epochs: float = 6.0,
    batch_size: int = 64,
    learning_rate: float = 2e-3,
    seed: int = 0,
    progress: bool = True,
) -> list[dict]:
    """Train ``model.audio_tower`` in place on frame-level detection; logs and plots the loss."""

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    encoder = model.model.audio_tower  # transformers 5: the tower sits on the inner model
    head = DetectionHead(encoder.config.d_model, targets.shape[-1])
    params = list(encoder.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.01)
    n = len(features)
    steps_per_epoch = math.ceil(n / batch_size)
    total = int(steps_per_epoch * epochs)
    history, start = [], time.time()
    out_dir.mkdir(parents=True, exist_ok=True)
    encoder.train()
    bar = tqdm(total=total, desc="encoder", disable=not progress, unit="step")
    step = 0
    while step < total:
        order = rng.permutation(n)
        for i in range(0, n, batch_size):
            if step >= total:
                break
            idx = np.sort(order[i : i + batch_size])
            feats = torch.from_numpy(np.asarray(features[idx], dtype=np.float32))
            for group in optimizer.param_groups:
                group["lr"] = learning_rate * min(1.0, (step + 1) / 30) * 0.5 * (1 + math.cos(math.pi * step / total))
            hidden = encoder(feats).last_hidden_state
            logits = head(hidden)
            target = torch.from_numpy(targets[idx])
            frame_loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
            clip_loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.max(dim=1).values, target.max(dim=1).values)
            loss = frame_loss + clip_loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            history.append({"step": step, "loss": round(loss.item(), 5), "frame_loss": round(frame_loss.item(), 5), "elapsed_s": round(time.time() - start, 1)})
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    encoder.eval()
    if val is not None:
        history[-1]["val_loss"] = round(_val_loss(encoder, head, *val, batch_size), 5)
    (out_dir / "log.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
    plot_losses(history, out_dir / "loss.png", "audio encoder: sound-event detection")
    return history


@torch.no_grad()
def _val_loss(encoder, head, features: np.ndarray, targets: np.ndarray, batch_size: int) -> float:
    total = 0.0
    for i in range(0, len(features), batch_size):
        logits = head(encoder(torch.from_numpy(np.asarray(features[i : i + batch_size], dtype=np.float32))).last_hidden_state)
        target = torch.from_numpy(targets[i : i + batch_size])
        total += torch.nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="sum").item() / target.shape[1] / target.shape[2]
    return total / len(features)
