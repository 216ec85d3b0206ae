"""Supervised stages on the corpus: *base* (from scratch, all weights) and *LISTEN* (audio adapter only).

Each scene becomes one multi-turn chat per epoch: either its caption, or a handful of its questions
(presence, order, count, duration) in random order. Losses go to ``log.jsonl`` and a PNG curve.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from train.data.conversations import IGNORE, Turn, audio_tokens_for_frames, encode_chat
from train.data.qa import QARow


@dataclass(frozen=True)
class StageConfig:
    name: str
    trainable: str = "all"  # "all" | "all_but_audio_encoder" | "audio_adapter" | "projector_and_lora" | "language_model_layers"
    epochs: float = 2.0
    batch_size: int = 16
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    turns_per_chat: int = 6
    caption_share: float = 0.35
    seed: int = 0
    kinds: tuple[str, ...] = ("presence", "order", "count", "duration", "caption")
    samplings: tuple[str, ...] = ("positive", "random", "popular", "adversarial")
    extra: dict = field(default_factory=dict)


def select_rows(rows: list[QARow], config: StageConfig) -> dict[str, list[QARow]]:
    """Rows the stage learns from, by scene; dropping absent samplings gives the hallucinating base."""
    by_scene: dict[str, list[QARow]] = defaultdict(list)
    for row in rows:
        if row.kind in config.kinds and (row.kind != "presence" or row.sampling in config.samplings):
            by_scene[row.scene_id].append(row)
    return dict(by_scene)


def _chats(by_scene: dict[str, list[QARow]], config: StageConfig, rng: random.Random) -> list[tuple[str, list[Turn]]]:
    chats = []
    for scene_id, rows in by_scene.items():
        captions = [r for r in rows if r.kind == "caption"]
        questions = [r for r in rows if r.kind != "caption"]
        if captions and (not questions or rng.random() < config.caption_share):
            chosen = [rng.choice(captions)]
        else:
            chosen = rng.sample(questions, min(config.turns_per_chat, len(questions)))
        chats.append((scene_id, [Turn(r.question, r.answer) for r in chosen]))
    rng.shuffle(chats)
    return chats


def pad_chats(tokenizer, encoded: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``labels`` and ``attention_mask`` of encoded chats (``encode_chat``)."""
    width = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(encoded), width), IGNORE, dtype=torch.long)
    attention = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, (ids, labs) in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(labs)] = torch.tensor(labs)
        attention[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def collate(tokenizer, features: np.ndarray, rows_of: dict[str, int], frames: np.ndarray, batch: list[tuple[str, list[Turn]]]) -> dict:
    idx = [rows_of[scene_id] for scene_id, _ in batch]
    text = pad_chats(tokenizer, [encode_chat(tokenizer, turns, audio_tokens_for_frames(int(frames[i]))) for i, (_, turns) in zip(idx, batch)])
    feats = torch.from_numpy(np.asarray(features[idx], dtype=np.float32))
    mask = (torch.arange(feats.shape[-1])[None, :] < torch.from_numpy(frames[idx])[:, None]).long()
    return {**text, "input_features": feats, "feature_attention_mask": mask}


def set_trainable(model, trainable: str) -> int:
    """Freeze all but the chosen part; returns the number of trainable parameters."""
    for name, param in model.named_parameters():
        param.requires_grad = (
            trainable == "all"
            or (trainable == "all_but_audio_encoder" and "audio_tower" not in name)
            or (trainable == "audio_adapter" and "multi_modal_projector" in name)
            or (trainable == "projector_and_lora" and ("multi_modal_projector" in name or "lora_" in name))
            or (trainable == "language_model_layers" and "language_model." in name and (".layers." in name or name.endswith("norm.weight")))
        )
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _lr(step: int, total: int, config: StageConfig) -> float:
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, total - config.warmup_steps)
    return config.learning_rate * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def evaluate_loss(model, tokenizer, features, rows_of, frames, by_scene, config: StageConfig, limit: int = 256, collate_fn=collate) -> float:
    model.eval()
    chats = _chats(dict(list(by_scene.items())[:limit]), config, random.Random(1234))
    total, count = 0.0, 0
    for start in range(0, len(chats), config.batch_size):
        batch = collate_fn(tokenizer, features, rows_of, frames, chats[start : start + config.batch_size])
        total += model(**batch).loss.item() * len(chats[start : start + config.batch_size])
        count += len(chats[start : start + config.batch_size])
    model.train()
    return total / max(1, count)


def train_stage(model, tokenizer, train_data: tuple, val_data: tuple, config: StageConfig, out_dir: Path, progress: bool = True, collate_fn=collate) -> list[dict]:
    """Train ``model`` in place; ``*_data`` are ``(features, rows_of, frames, by_scene)``.

    ``collate_fn`` turns chats into the model's inputs: log-mels by default, cached tower outputs
    with ``train.cached_tower.collate_encoded`` (then ``model`` is a ``train.cached_tower.EncodedForward``).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    n_trainable = set_trainable(model, config.trainable)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    features, rows_of, frames, by_scene = train_data
    steps_per_epoch = math.ceil(len(by_scene) / config.batch_size)
    total = max(1, int(steps_per_epoch * config.epochs))
    history: list[dict] = []
    log = (out_dir / "log.jsonl").open("w")
    model.train()
    step, start = 0, time.time()
    bar = tqdm(total=total, desc=f"{config.name}", disable=not progress, unit="step")
    while step < total:
        chats = _chats(by_scene, config, rng)
        for i in range(0, len(chats), config.batch_size):
            if step >= total:
                break
            batch = collate_fn(tokenizer, features, rows_of, frames, chats[i : i + config.batch_size])
            for group in optimizer.param_groups:
                group["lr"] = _lr(step, total, config)
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            record = {"step": step, "epoch": step / steps_per_epoch, "loss": round(loss.item(), 5), "lr": optimizer.param_groups[0]["lr"], "elapsed_s": round(time.time() - start, 1)}
            if step % steps_per_epoch == 0 or step == total:
                record["val_loss"] = round(evaluate_loss(model, tokenizer, *val_data, config, collate_fn=collate_fn), 5)
            history.append(record)
            log.write(json.dumps(record) + "\n")
            log.flush()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    log.close()
    model.eval()
    (out_dir / "train.json").write_text(json.dumps({"config": asdict(config), "trainable_parameters": n_trainable, "steps": step, "wall_s": round(time.time() - start, 1)}, indent=2))
    plot_losses(history, out_dir / "loss.png", config.name)
    return history


def plot_losses(history: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = [h["step"] for h in history]
    losses = [h["loss"] for h in history]
    window = max(1, len(losses) // 50)
    smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
    ax.plot(steps, losses, alpha=0.3, label="train (per step)")
    ax.plot(steps[window - 1 :], smooth, label=f"train (mean of {window})")
    val = [(h["step"], h["val_loss"]) for h in history if "val_loss" in h]
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
