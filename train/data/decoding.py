"""Read every source file (plain, inside an rcc bundle or a game archive) and decode it once to 16 kHz.

Decoding goes through the one decoder (``models.audio.decode``) the server uses, so the corpus hears what the
server would; files it rejects are skipped and counted by error code.
"""

from __future__ import annotations

import os
import struct
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from models.cache import cache_dir
from models.audio import AudioError, decode
from train.data.archives import ArchiveError, is_archived, read_member
from train.data.rcc import RccBundle, RccError
from train.data.sources import SourceClip

SAMPLE_RATE = 16_000
MAX_SOURCE_S = 30.0  # longer recordings are cut: a 10 s scene never needs more


class _RccIndex:
    """Maps in-bundle paths of every ``.rcc`` under a package root to the bundle holding them."""

    def __init__(self, root: Path):
        self.entries: dict[str, tuple[Path, str]] = {}
        for rcc in sorted(root.rglob("*.rcc")):
            try:
                bundle = RccBundle(rcc.read_bytes())
                for e in bundle.entries():
                    self.entries.setdefault(e.path, (rcc, e.path))
            except (RccError, OSError, IndexError, UnicodeDecodeError, struct.error):  # a bad bundle is skipped
                continue

    def read(self, inner: str) -> bytes:
        hit = self.entries.get(inner)
        if hit is None:
            raise FileNotFoundError(inner)
        bundle = RccBundle(hit[0].read_bytes())
        for e in bundle.entries():
            if e.path == inner:
                return e.read()
        raise FileNotFoundError(inner)


def read_source_bytes(clip: SourceClip, root: Path, rcc: _RccIndex | None = None) -> bytes:
    """The raw bytes of a source file, from the unpacked tree or from inside an rcc bundle."""
    if clip.path.startswith("rcc:"):
        if rcc is None:
            rcc = _RccIndex(root)
        return rcc.read(clip.path.removeprefix("rcc:"))
    if is_archived(clip.path):
        return read_member(clip.path, root)
    return (root / clip.path.lstrip("/")).read_bytes()


def active_region(samples: np.ndarray, sr: int = SAMPLE_RATE, rel_db: float = -40.0, floor_db: float = -65.0,
                  frame: int = 160) -> tuple[int, int] | None:
    """[start, end) sample range whose 10 ms frames are within ``rel_db`` of the loudest frame.

    Used to trim events so their labelled onset/offset hug the sound, not its silent padding.
    """
    n = len(samples) // frame
    if n == 0:
        return None
    rms = np.sqrt(np.mean(samples[: n * frame].reshape(n, frame).astype(np.float64) ** 2, axis=1) + 1e-20)
    db = 20 * np.log10(rms)
    thr = max(db.max() + rel_db, floor_db)
    idx = np.flatnonzero(db >= thr)
    if idx.size == 0:
        return None
    return int(idx[0] * frame), int(min(len(samples), (idx[-1] + 1) * frame))


def _decode_to_cache(clip_id: str, data: bytes, out_path: Path) -> tuple[str, str | None, float]:
    """Decode bytes with the serving decoder and cache them; (id, skip reason or None, seconds)."""
    try:
        decoded = decode(data, SAMPLE_RATE, max_duration_s=MAX_SOURCE_S, truncate=True)
    except AudioError as exc:
        return clip_id, exc.code, 0.0
    if "digital_silence" in decoded.flags:
        return clip_id, "digital_silence", 0.0
    region = active_region(decoded.samples)
    if region is None or region[1] - region[0] < SAMPLE_RATE // 20:
        return clip_id, "too_quiet_or_short", 0.0
    tmp = out_path.with_suffix(".tmp.npy")
    np.save(tmp, decoded.samples.astype(np.float32))
    os.replace(tmp, out_path)
    return clip_id, None, decoded.duration_s


def _decode_one(args: tuple[SourceClip, str, str]) -> tuple[str, str | None, float]:
    """Worker: decode one plain file (cached results are reused)."""
    clip, root, out = args
    out_path = Path(out)
    if out_path.exists():
        return clip.id, None, len(np.load(out_path, mmap_mode="r")) / SAMPLE_RATE
    try:
        data = read_source_bytes(clip, Path(root))
    except FileNotFoundError:
        return clip.id, "missing_file", 0.0
    except RccError as exc:
        return clip.id, "rcc_zstd_unsupported" if "zstd" in str(exc) else "rcc_corrupt", 0.0
    except ArchiveError:
        return clip.id, "archive_member_unreadable", 0.0
    return _decode_to_cache(clip.id, data, out_path)


def decode_sources(clips: Sequence[SourceClip], roots: dict[str, Path], cache: Path | None = None,
                   workers: int = 2, progress: bool = True) -> tuple[dict[str, Path], Counter, dict[str, float]]:
    """Decode every clip once (via ``models.audio.decode``) into ``cache/clips16k/<id>.npy``.

    Bad or unsupported files are skipped and counted by error code; the build goes on.
    """
    from tqdm import tqdm

    cache = cache or cache_dir()
    out_dir = cache / "clips16k"
    out_dir.mkdir(parents=True, exist_ok=True)
    skipped: Counter = Counter()
    paths: dict[str, Path] = {}
    durations: dict[str, float] = {}
    jobs = []
    for c in clips:
        if c.package not in roots:
            skipped["package_unavailable"] += 1
            continue
        jobs.append((c, str(roots[c.package]), str(out_dir / f"{c.id}.npy")))
    # rcc reads are grouped in-process: each worker would otherwise re-index every bundle.
    rcc_jobs = [j for j in jobs if j[0].path.startswith("rcc:")]
    file_jobs = [j for j in jobs if not j[0].path.startswith("rcc:")]
    bar = tqdm(total=len(jobs), desc="decode sources", unit="clip", disable=not progress)

    def record(result: tuple[str, str | None, float]) -> None:
        cid, why, dur = result
        if why is None:
            paths[cid] = out_dir / f"{cid}.npy"
            durations[cid] = dur
        else:
            skipped[why] += 1
        bar.update(1)

    if rcc_jobs:
        index: dict[str, _RccIndex] = {}
        for clip, root, out in rcc_jobs:
            if Path(out).exists():
                record(_decode_one((clip, root, out)))
                continue
            idx = index.setdefault(root, _RccIndex(Path(root)))
            try:
                data = idx.read(clip.path.removeprefix("rcc:"))
            except FileNotFoundError:
                record((clip.id, "missing_file", 0.0))
                continue
            except RccError as exc:
                record((clip.id, "rcc_zstd_unsupported" if "zstd" in str(exc) else "rcc_corrupt", 0.0))
                continue
            record(_decode_to_cache(clip.id, data, Path(out)))
    if workers > 1 and len(file_jobs) > 32:
        with ProcessPoolExecutor(max_workers=min(workers, 2)) as pool:
            for result in pool.map(_decode_one, file_jobs, chunksize=16):
                record(result)
    else:
        for job in file_jobs:
            record(_decode_one(job))
    bar.close()
    return paths, skipped, durations
