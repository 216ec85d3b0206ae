"""Near-duplicate recordings and the split by recording: fingerprints, frame alignment, components, splits.

Clips that share a recording group, or whose audio matches, always land in one split, so no
recording is heard in training and again in test.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict

import numpy as np

from train.data.decoding import SAMPLE_RATE, active_region
from train.data.sources import SourceClip


def fingerprint(samples: np.ndarray, sr: int = SAMPLE_RATE, steps: int = 32, bands: int = 24) -> np.ndarray:
    """Coarse spectro-temporal fingerprint: log band energies of the active region on a 32-step grid.

    Robust to resampling, re-encoding and gain, so the same recording shipped twice (e.g. in
    two packages, or two game mods) is recognised as one.
    """
    region = active_region(samples, sr)
    x = samples[region[0]: region[1]] if region else samples
    n_fft, hop = 512, 256
    if len(x) < n_fft:
        x = np.pad(x, (0, n_fft - len(x)))
    frames = np.lib.stride_tricks.sliding_window_view(x, n_fft)[::hop] * np.hanning(n_fft)
    spec = np.abs(np.fft.rfft(frames, axis=1)) ** 2
    edges = np.unique(np.geomspace(2, spec.shape[1] - 1, bands + 1).astype(int))
    band = np.stack([spec[:, a:b].sum(axis=1) for a, b in zip(edges[:-1], edges[1:])], axis=1)
    logb = np.log10(band + 1e-10)
    t_old = np.linspace(0, 1, len(logb))
    t_new = np.linspace(0, 1, steps)
    grid = np.stack([np.interp(t_new, t_old, logb[:, j]) for j in range(logb.shape[1])], axis=1)
    v = (grid - grid.mean()).ravel()
    return (v / (np.linalg.norm(v) + 1e-9)).astype(np.float32)


def same_sound(fps_a: np.ndarray, dur_a: np.ndarray, fps_b: np.ndarray, dur_b: np.ndarray, threshold: float = 0.97) -> np.ndarray:
    """Which rows of ``a`` sound like which rows of ``b``: fingerprints match (cosine ≥ threshold), lengths within 10 %."""
    ratio = np.abs(np.log((dur_a[:, None] + 1e-3) / (dur_b[None, :] + 1e-3)))
    return (fps_a @ fps_b.T >= threshold) & (ratio < 0.1)


def duplicate_pairs(fps: np.ndarray, durations: np.ndarray, threshold: float = 0.97) -> list[tuple[int, int]]:
    """Index pairs of clips that sound the same (:func:`same_sound`)."""
    hit = same_sound(fps, durations, fps, durations, threshold)
    np.fill_diagonal(hit, False)
    i, j = np.nonzero(np.triu(hit))
    return list(zip(i.tolist(), j.tolist()))


ALIGN_HOP = 400  # 25 ms frames for the alignment fingerprint


def frame_profile(samples: np.ndarray, bands: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """``([frames, bands] unit-norm spectral shapes, [frames] loudness in dB)`` of 25 ms frames.

    Aligned frame by frame, two copies of one recording match wherever they overlap, whatever
    was cut from either end, its gain or its resampling (bands stop at 4 kHz, which 8 kHz copies
    keep); frames 50 dB under the peak count as silence.
    """
    n_fft = 1024
    x = samples if len(samples) >= n_fft else np.pad(samples, (0, n_fft - len(samples)))
    frames = np.lib.stride_tricks.sliding_window_view(x, n_fft)[::ALIGN_HOP] * np.hanning(n_fft)
    spec = np.abs(np.fft.rfft(frames, axis=1)) ** 2
    top = int(4000 / (SAMPLE_RATE / n_fft))
    edges = np.unique(np.geomspace(3, top, bands + 1).astype(int))
    band = np.stack([spec[:, a:b].sum(axis=1) for a, b in zip(edges[:-1], edges[1:])], axis=1)
    logb = np.log10(band + 1e-10)
    loud = 10 * np.log10(band.sum(axis=1) + 1e-10)
    shape = logb - logb.mean(axis=1, keepdims=True)
    shape /= np.linalg.norm(shape, axis=1, keepdims=True) + 1e-9
    shape[loud < loud.max() - 50.0] = 0.0
    return shape.astype(np.float32), loud.astype(np.float32)


def aligned_similarity(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray], min_overlap_s: float = 2.0,
                       candidates: int = 5) -> tuple[float, float]:
    """``(spectral-shape similarity, loudness-envelope correlation)`` at the best alignment of two profiles.

    Lags need an overlap of ``min_overlap_s`` and half the shorter clip: one-shots (a drum hit, a bark) all
    share a strike-and-decay envelope, so only recordings that long are compared (the fixed-length
    :func:`fingerprint` still catches exact copies of short ones). Shape alone matches any two
    recordings of one steady texture (two fires, two winds); only a copy also follows the other's
    loudness, frame by frame, so the candidate lags with the best shapes are judged by both.
    """
    (sa, la), (sb, lb) = a, b
    sim = sa @ sb.T
    lag = (np.arange(len(sa))[:, None] - np.arange(len(sb))[None, :]).ravel() + len(sb) - 1
    total = np.bincount(lag, weights=sim.ravel(), minlength=len(sa) + len(sb) - 1)
    active = (np.abs(sa).sum(1) > 0).astype(np.float32)[:, None] * (np.abs(sb).sum(1) > 0).astype(np.float32)[None, :]
    count = np.bincount(lag, weights=active.ravel(), minlength=len(sa) + len(sb) - 1)
    need = max(min_overlap_s * SAMPLE_RATE / ALIGN_HOP, 0.5 * min(len(sa), len(sb)))
    score = np.where(count >= need, total / np.maximum(count, 1), -1.0)
    best = (0.0, 0.0)
    for k in np.argsort(score)[::-1][:candidates]:
        if score[k] <= 0:
            break
        shift = int(k) - (len(sb) - 1)  # frame i of a meets frame i - shift of b
        i0, i1 = max(0, shift), min(len(sa), len(sb) + shift)
        x, y = la[i0:i1], lb[i0 - shift:i1 - shift]
        corr = float(np.corrcoef(x, y)[0, 1]) if x.std() > 1e-3 and y.std() > 1e-3 else 0.0
        if min(score[k], corr) > min(best):
            best = (float(score[k]), corr)
    return best


def cross_package_duplicates(clips: Sequence[SourceClip], profiles: dict[str, tuple[np.ndarray, np.ndarray]],
                             shape_threshold: float = 0.85, envelope_threshold: float = 0.9) -> list[tuple[str, str, float]]:
    """Same-class clips of different packages that hold one recording: games ship the same public
    recordings, cropped, re-encoded or resampled. Returns (id, id, envelope correlation) pairs."""
    by_label: dict[str, list[SourceClip]] = defaultdict(list)
    for c in clips:
        if c.id in profiles:
            by_label[c.label].append(c)
    found = []
    for members in by_label.values():
        for i, a in enumerate(members):
            for b in members[i + 1:]:
                if a.package != b.package:
                    shape, envelope = aligned_similarity(profiles[a.id], profiles[b.id])
                    if shape >= shape_threshold and envelope >= envelope_threshold:
                        found.append((a.id, b.id, round(envelope, 4)))
    return found


class _UnionFind:
    def __init__(self, items: Iterable[str]):
        self.parent = {x: x for x in items}

    def find(self, x: str) -> str:
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


SPLITS = ("train", "validation", "test")


def assign_splits(clips: Sequence[SourceClip], dup_pairs: Iterable[tuple[str, str]] = ()) -> dict[str, str]:
    """Split by recording: clips sharing a group or an audio fingerprint always share a split.

    Per class, components are ordered by a hash of their key (independent of the build seed,
    so different seeds never leak a recording across splits) and about 12 % go to test, 8 % to
    validation, with at least one test component once a class has two, and one validation
    component once it has three.
    """
    component = recording_components(clips, dup_pairs)
    comps: dict[str, list[SourceClip]] = defaultdict(list)
    for c in clips:
        comps[component[c.id]].append(c)
    per_label: dict[str, list[str]] = defaultdict(list)
    for root, members in comps.items():
        label = Counter(m.label for m in members).most_common(1)[0][0]
        per_label[label].append(root)
    comp_split: dict[str, str] = {}
    for label, roots in per_label.items():
        roots.sort(key=lambda r: hashlib.sha1(r.encode()).hexdigest())
        n = len(roots)
        n_test = 0 if n < 2 else max(1, round(0.12 * n))
        n_val = 0 if n < 3 else max(1, round(0.08 * n))
        for k, r in enumerate(roots):
            comp_split[r] = "test" if k < n_test else "validation" if k < n_test + n_val else "train"
    return {c.id: comp_split[component[c.id]] for c in clips}


def recording_components(clips: Sequence[SourceClip], dup_pairs: Iterable[tuple[str, str]] = ()) -> dict[str, str]:
    """Clip id → its recording: the union of its group with every group it duplicates."""
    uf = _UnionFind(c.group for c in clips)
    for a, b in dup_pairs:
        uf.union(a, b)
    return {c.id: uf.find(c.group) for c in clips}


def source_record(clip: SourceClip, split: str, duration: float) -> dict:
    """One ``sources.jsonl`` line: where the audio came from and which split it serves."""
    d = asdict(clip)
    d.update(split=split, duration=round(duration, 3))
    return d
