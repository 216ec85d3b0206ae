"""Features of every scene, computed once: log-mels for a model's own extractor, and the outputs of
frozen pretrained encoders.

Training reads the same scene in every epoch and for many questions; caching its features
(float16, one array per split) takes the feature extractor, and a frozen encoder, out of the
training loop.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
from tqdm import tqdm

from models.pretrained import whisper_encoder, whisper_feature_extractor
from models.pretrained.whisper import POSITIONS_PER_SECOND, encode_layers
from models.verifier.scorer import AisfxFrontend, YamnetFrontend, YamnetScorerConfig
from train.data.augment import AugmentConfig, augment_scene


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


# --------------------------------------------------------------------------- frozen pretrained encoders

#: Pretrained encoders the probe and the verifier read (``models.pretrained``).
PRETRAINED_ENCODERS = ("whisper-tiny.en", "whisper-base")


@dataclass(frozen=True)
class EncodedSplit:
    """A frozen encoder's outputs for every scene of one split: ``last`` (the audio tower's output, the
    tensor Qwen2-Audio's projector reads) and ``middle`` (its middle layer, avg-pooled the same way),
    each ``[N, positions, d_model]`` float16; ``rows`` maps scene id → row; ``view`` 0 is the clean audio."""

    last: np.ndarray
    middle: np.ndarray
    rows: dict[str, int]
    view: int


def encoder_tag(encoder: str, window_s: int) -> str:
    """The feature cache's name for an encoder: a pinned part or hub id as it is; a directory (a distilled tower,
    ``train.tower.export_whisper``) by its parent's name and its own."""
    path = Path(encoder)
    name = f"{path.parent.name}-{path.name}" if path.is_dir() else encoder.replace("/", "--")
    return f"{name}-{window_s}s"


def _encoder_files(corpus_dir: Path, split: str, tag: str, view: int) -> tuple[Path, Path, Path]:
    base = Path(corpus_dir) / "features" / tag
    stem = f"{split}.v{view}"
    return base / f"{stem}.last.npy", base / f"{stem}.middle.npy", base / f"{stem}.json"


def encoder_features(corpus_dir: str | Path, split: str, encoder: str, window_s: int = 10, view: int = 0,
                     batch_size: int = 8, progress: bool = True, augment_seed: int = 0) -> EncodedSplit:
    """A frozen pretrained encoder's outputs for a split, computed once and cached per (encoder, window, view).

    View ``k > 0`` encodes the scenes through the recording-setup augmentation
    (``train.data.augment.augment_scene``, seeded by ``(augment_seed, k, row)``): the same scenes and
    labels heard through other microphones, rooms and codecs. Every later stage reads these arrays,
    never the audio.
    """

    corpus_dir = Path(corpus_dir)
    last_path, middle_path, index_path = _encoder_files(corpus_dir, split, encoder_tag(encoder, window_s), view)
    if last_path.exists() and middle_path.exists() and index_path.exists():
        rows = json.loads(index_path.read_text())["rows"]
        return EncodedSplit(np.load(last_path, mmap_mode="r"), np.load(middle_path, mmap_mode="r"), rows, view)
    files = sorted((corpus_dir / "scenes" / split).glob("*.flac"))
    if not files:
        raise FileNotFoundError(f"no scenes under {corpus_dir / 'scenes' / split}")
    tower = whisper_encoder(encoder, max_source_positions=window_s * POSITIONS_PER_SECOND)
    extractor = whisper_feature_extractor(chunk_length=window_s, num_mel_bins=tower.config.num_mel_bins)
    last_path.parent.mkdir(parents=True, exist_ok=True)
    shape = (len(files), window_s * POSITIONS_PER_SECOND // 2, tower.config.d_model)
    tmp = [p.with_suffix(".tmp.npy") for p in (last_path, middle_path)]
    last = np.lib.format.open_memmap(tmp[0], mode="w+", dtype=np.float16, shape=shape)
    middle = np.lib.format.open_memmap(tmp[1], mode="w+", dtype=np.float16, shape=shape)
    bar = tqdm(total=len(files), desc=f"{encoder} {split} v{view}", disable=not progress, unit="scene")
    for start in range(0, len(files), batch_size):
        clips = [scene_audio(f, extractor.sampling_rate, view, augment_seed, start + k)
                 for k, f in enumerate(files[start:start + batch_size])]
        feats = extractor(clips, sampling_rate=extractor.sampling_rate, padding="max_length", return_tensors="pt")
        a, b = encode_layers(tower, feats["input_features"])
        last[start:start + len(clips)] = a.numpy().astype(np.float16)
        middle[start:start + len(clips)] = b.numpy().astype(np.float16)
        bar.update(len(clips))
    bar.close()
    last.flush(), middle.flush()
    del last, middle
    for t, final in zip(tmp, (last_path, middle_path)):
        t.replace(final)
    rows = {f.stem: i for i, f in enumerate(files)}
    index_path.write_text(json.dumps({"rows": rows, "encoder": encoder, "window_s": window_s, "view": view,
                                      "augment_seed": augment_seed}))
    return EncodedSplit(np.load(last_path, mmap_mode="r"), np.load(middle_path, mmap_mode="r"), rows, view)


def scene_audio(path: Path, sampling_rate: int, view: int, seed: int, row: int) -> np.ndarray:
    samples, sr = sf.read(path, dtype="float32")
    if sr != sampling_rate:
        raise ValueError(f"{path.name}: {sr} Hz, the encoder expects {sampling_rate} Hz")
    if view == 0:
        return samples
    from dataclasses import replace

    # every scene of an augmented view is augmented: a clean one would repeat view 0
    return augment_scene(samples, np.random.default_rng([seed, view, row]), replace(AugmentConfig(), p_scene=1.0))


def yamnet_features(corpus_dir: str | Path, split: str, view: int = 0, batch_size: int = 16, progress: bool = True,
                    augment_seed: int = 0) -> tuple[np.ndarray, dict[str, int]]:
    """Frozen YAMNet's embedding ⊕ AudioSet logits per patch for every scene of a split (``[N, P, 1545]`` float16),
    computed once and cached per view (augmented views as :func:`encoder_features`)."""

    corpus_dir = Path(corpus_dir)
    path, _, index_path = _encoder_files(corpus_dir, split, "yamnet", view)
    return scene_cache(path, index_path, corpus_dir, split, lambda: YamnetFrontend(YamnetScorerConfig()).features, f"yamnet {split} v{view}",
                       lambda k, f: scene_audio(f, 16_000, view, augment_seed, k), batch_size, progress,
                       {"encoder": "yamnet", "view": view, "augment_seed": augment_seed})


def aisfx_features(corpus_dir: str | Path, split: str, view: int = 0, batch_size: int = 8, progress: bool = True,
                   augment_seed: int = 0) -> tuple[np.ndarray, dict[str, int]]:
    """Frozen aiSFX's step embedding ⊕ library logits for every scene of a split (``[N, T, 890]`` float16, one step per
    0.186 s), computed once and cached per view (augmented views as :func:`encoder_features`)."""

    corpus_dir = Path(corpus_dir)
    path, _, index_path = _encoder_files(corpus_dir, split, "aisfx", view)
    return scene_cache(path, index_path, corpus_dir, split, lambda: AisfxFrontend().features, f"aisfx {split} v{view}",
                       lambda k, f: scene_audio(f, 16_000, view, augment_seed, k), batch_size, progress,
                       {"encoder": "aisfx", "view": view, "augment_seed": augment_seed})


def scene_cache(path: Path, index_path: Path, corpus_dir: Path, split: str, make_compute, desc: str, clip_of=None, batch_size: int = 16,
                progress: bool = True, meta: dict | None = None) -> tuple[np.ndarray, dict[str, int]]:
    """A per-scene array of a split, computed once in batches and cached (``[N, ...]`` float16, written through a
    temporary memmap so an interrupted run leaves no half file): ``make_compute()`` (called only when the cache is
    missing) → ``compute(waves [B, samples])`` → ``[B, ...]``; ``clip_of(row, file)`` → the scene's samples (default:
    the file as it is)."""
    import torch

    if path.exists() and index_path.exists():
        return np.load(path, mmap_mode="r"), json.loads(index_path.read_text())["rows"]
    files = sorted((Path(corpus_dir) / "scenes" / split).glob("*.flac"))
    if not files:
        raise FileNotFoundError(f"no scenes under {Path(corpus_dir) / 'scenes' / split}")
    clip_of = clip_of or (lambda _, f: sf.read(f, dtype="float32")[0])
    compute = make_compute()
    out = None
    with tqdm(total=len(files), desc=desc, disable=not progress, unit="scene") as bar, torch.inference_mode():
        for start in range(0, len(files), batch_size):
            clips = [clip_of(start + k, f) for k, f in enumerate(files[start:start + batch_size])]
            n = max(len(c) for c in clips)
            x = compute(torch.from_numpy(np.stack([np.pad(c, (0, n - len(c))) for c in clips]).astype(np.float32)))
            x = x.numpy().astype(np.float16)
            if out is None:
                path.parent.mkdir(parents=True, exist_ok=True)
                out = np.lib.format.open_memmap(path.with_suffix(".tmp.npy"), mode="w+", dtype=np.float16, shape=(len(files), *x.shape[1:]))
            out[start:start + len(clips)] = x
            bar.update(len(clips))
    out.flush()
    del out
    path.with_suffix(".tmp.npy").replace(path)
    rows = {f.stem: i for i, f in enumerate(files)}
    index_path.write_text(json.dumps({"rows": rows, **(meta or {})}))
    return np.load(path, mmap_mode="r"), rows
