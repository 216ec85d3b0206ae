"""Frozen encoder features of a corpus split with their strong labels: what the probes, the tagger and the verifier fit heads on.

``load_split`` reads a split's cached encoder outputs (``train.features``), pools them to :data:`PROBE_POSITIONS`
steps as the served verifier does and pairs them with each position's strong-label activity and each scene's source
packages; ``encoded_split`` does the same for a checkpoint's own audio tower.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models.pretrained import aisfx, yamnet
from models.registry import resolve
from models.small import is_assembled_checkpoint, read_spec
from models.tiny import TinySize
from models.verifier.scorer import pool_positions
from train.data.formats import read_timelines
from train.data.mixer import SCENE_S
from train.data.targets import frame_targets, patch_targets
from train.features import aisfx_features, encoder_features, feature_tag, scene_features, yamnet_features

PROBE_POSITIONS = 125  # 80 ms: the strong labels' events are longer than that


@dataclass
class ProbeData:
    """Features ``[N, P, D]`` (float16), strong-label activity ``[N, P, C]`` and each scene's source packages."""

    features: np.ndarray
    targets: np.ndarray
    rows: dict[str, int]
    packages: list[set[str]]
    event_packages: list[dict[str, set[str]]]  # per scene: class → packages its events came from


def pool_time(x: np.ndarray, positions: int) -> np.ndarray:
    """Average ``[N, P, D]`` down to ``positions`` steps (P a multiple of it), as the served verifier does."""

    return pool_positions(torch.from_numpy(np.asarray(x, dtype=np.float32)), positions).numpy().astype(np.float16)


def scene_packages(corpus_dir: Path, timelines: dict, rows: dict[str, int]) -> tuple[list[set[str]], list[dict[str, set[str]]]]:
    """Per scene row: the packages of all its sources, and per class the packages its events came from."""
    package_of = {}
    with (corpus_dir / "sources.jsonl").open(encoding="utf-8") as fh:
        for line in fh:
            r = json.loads(line)
            package_of[r["id"]] = r["package"]
    packages: list[set[str]] = [set() for _ in rows]
    by_class: list[dict[str, set[str]]] = [defaultdict(set) for _ in rows]
    for sid, row in rows.items():
        t = timelines[sid]
        for e in t["events"]:
            pkg = package_of.get(e["source_id"], "synthetic")
            packages[row].add(pkg)
            by_class[row][e["label"]].add(pkg)
        bed = t.get("background") or {}
        if bed.get("source_id"):
            pkg = package_of.get(bed["source_id"], "synthetic")
            packages[row].add(pkg)
            by_class[row][bed["label"]].add(pkg)
    return packages, by_class


def load_split(corpus_dir: Path, split: str, encoder: str, classes: list[str], layers: str = "both",
               views: tuple[int, ...] = (0,), window_s: int = 10, progress: bool = True) -> ProbeData:
    """One split's frozen features (views stacked), pooled to :data:`PROBE_POSITIONS`, with their labels; for
    ``encoder="yamnet"``, YAMNet's patches (0.96 s every 0.48 s) with patch-aligned labels; ``"aisfx"``, aiSFX's
    0.186 s steps with step-aligned labels."""
    feats, targets, rows = [], [], {}
    timelines = read_timelines(corpus_dir, split)
    if encoder in ("yamnet", "aisfx"):

        read, window_s, hop_s = ((yamnet_features, yamnet.PATCH_S, yamnet.PATCH_HOP_S) if encoder == "yamnet"
                                 else (aisfx_features, aisfx.STEP_S, aisfx.STEP_S))
        for view in views:
            x, view_rows = read(corpus_dir, split, view=view, progress=progress)
            feats.append(np.asarray(x))
            targets.append(patch_targets(timelines, view_rows, classes, x.shape[1], window_s, hop_s))
            rows = rows or view_rows
        packages, event_packages = scene_packages(corpus_dir, timelines, rows)
        return ProbeData(np.concatenate(feats), np.concatenate(targets), rows, packages * len(views), event_packages * len(views))
    for view in views:
        enc = encoder_features(corpus_dir, split, encoder, window_s=window_s, view=view, progress=progress)
        parts = {"last": [enc.last], "middle": [enc.middle], "both": [enc.last, enc.middle]}[layers]
        heard = int(enc.last.shape[1] * SCENE_S / window_s)  # a 30 s window holds the 10 s scene, then padding
        pooled = np.concatenate([pool_time(np.asarray(p[:, :heard]), PROBE_POSITIONS) for p in parts], axis=-1)
        feats.append(pooled)
        targets.append(frame_targets(timelines, enc.rows, classes, PROBE_POSITIONS, SCENE_S))
        if view == views[0]:
            rows = enc.rows
    packages, event_packages = scene_packages(corpus_dir, timelines, rows)  # every view holds the same scenes, in order
    return ProbeData(np.concatenate(feats), np.concatenate(targets), rows, packages * len(views), event_packages * len(views))


def held_out_packages(corpus_dir: Path, count: int = 6) -> list[str]:
    """The packages with the most distinct non-speech classes among the labelled sources (teacher-labelled files do not
    count): each is left out of training in turn."""
    classes: dict[str, set[str]] = defaultdict(set)
    with (corpus_dir / "sources.jsonl").open(encoding="utf-8") as fh:
        for line in fh:
            r = json.loads(line)
            if r["label"] != "Speech" and r["package"] != "synthetic" and not r.get("teacher"):
                classes[r["package"]].add(r["label"])
    return sorted(classes, key=lambda p: (-len(classes[p]), p))[:count]


@torch.no_grad()
def encoder_outputs(model, features: np.ndarray, batch_size: int = 64) -> torch.Tensor:
    tower = model.model.audio_tower.eval()
    chunks = [tower(torch.from_numpy(np.asarray(features[i : i + batch_size], dtype=np.float32))).last_hidden_state
              for i in range(0, len(features), batch_size)]
    return torch.cat(chunks)


def encoded_split(model_dir: str | Path, model, processor, corpus_dir: Path, split: str, classes: list[str]) -> tuple[torch.Tensor, dict[str, int], torch.Tensor]:
    """``(audio tokens [N, P, dim], scene_id → row, strong-label activity [N, P, classes])`` of one split, from
    the checkpoint's own audio tower: a tiny model's runs on its cached mels; earwitness-small's is a frozen
    pretrained encoder, whose outputs the feature cache already holds (``train.features.encoder_features``)."""

    source = resolve(str(model_dir)).source
    if is_assembled_checkpoint(source):

        spec = read_spec(source)
        enc = encoder_features(corpus_dir, split, spec.encoder, spec.window_s, progress=False)
        hidden, rows_of, window_s = torch.from_numpy(np.asarray(enc.last, dtype=np.float32)), enc.rows, float(spec.window_s)
    else:

        size = TinySize(**model.config.earwitness_tiny_size)
        features, rows_of, _ = scene_features(corpus_dir, split, processor.feature_extractor, feature_tag(size), progress=False)
        hidden, window_s = encoder_outputs(model, features), float(size.chunk_s)
    timelines = read_timelines(corpus_dir, split)
    return hidden, rows_of, torch.from_numpy(frame_targets(timelines, rows_of, classes, hidden.shape[1], window_s))
