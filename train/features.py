"""Log-mel features of every scene, computed once with the model's own feature extractor.

Training reads the same scene in every epoch and for many questions; caching its features
(float16, one array per split) takes the feature extractor out of the training loop.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import soundfile as sf
from tqdm import tqdm


def feature_tag(size) -> str:
    """The cache key of a tiny model's feature extractor (``models.tiny.TinySize``): features depend on nothing else."""
    return f"mel{size.mel_bins}-hop{size.hop_length}-{size.chunk_s}s"


def feature_cache(corpus_dir: Path, split: str, tag: str) -> tuple[Path, Path]:
    base = Path(corpus_dir) / "features" / tag
    return base / f"{split}.npy", base / f"{split}.json"


def scene_features(corpus_dir: str | Path, split: str, extractor, tag: str, progress: bool = True) -> tuple[np.ndarray, dict[str, int], np.ndarray]:
    """``(features[N, mel, frames] float16, scene_id → row, frames_used[N])`` for a split, cached per ``tag``."""
    corpus_dir = Path(corpus_dir)
    array_path, index_path = feature_cache(corpus_dir, split, tag)
    if array_path.exists() and index_path.exists():
        index = json.loads(index_path.read_text())
        return np.load(array_path, mmap_mode="r"), index["rows"], np.asarray(index["frames"], dtype=np.int32)
    files = sorted((corpus_dir / "scenes" / split).glob("*.flac"))
    rows: dict[str, int] = {}
    frames = np.zeros(len(files), dtype=np.int32)
    out = None
    for i, path in enumerate(tqdm(files, desc=f"features {split}", disable=not progress, unit="scene")):
        samples, sr = sf.read(path, dtype="float32")
        if sr != extractor.sampling_rate:
            raise ValueError(f"{path.name}: {sr} Hz, the extractor expects {extractor.sampling_rate} Hz")
        feats = extractor(samples, sampling_rate=sr, return_attention_mask=True, padding="max_length", return_tensors="np")
        if out is None:
            out = np.zeros((len(files), *feats["input_features"].shape[1:]), dtype=np.float16)
        out[i] = feats["input_features"][0]
        frames[i] = int(feats["attention_mask"][0].sum())
        rows[path.stem] = i
    if out is None:
        raise FileNotFoundError(f"no scenes under {corpus_dir / 'scenes' / split}")
    array_path.parent.mkdir(parents=True, exist_ok=True)
    np.save(array_path, out)
    index_path.write_text(json.dumps({"rows": rows, "frames": frames.tolist()}))
    return out, rows, frames
