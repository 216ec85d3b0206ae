"""Scene mixer: 10 s scenes of 1–4 real events over a background bed, with exact event times.

Planning (which clip, where, how loud) is separated from rendering so a scene can be
re-rendered from its JSON timeline alone — e.g. with only one event, to prove its labels.
Events are trimmed to their energy-active region before placement, so an event's labelled
onset/offset are where its sound starts and stops, not where its file's padding does.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from train.data.decoding import SAMPLE_RATE, active_region

SCENE_S = 10.0
FADE_S = 0.005
EVENT_COUNT_WEIGHTS = {1: 0.2, 2: 0.35, 3: 0.3, 4: 0.15}


@dataclass(frozen=True)
class Event:
    """A placed foreground event; ``source_start``/``length`` index the source's 16 kHz samples."""

    label: str
    source_id: str
    source_start: int
    length: int
    onset_sample: int
    gain_db: float
    snr_db: float

    @property
    def onset(self) -> float:
        return round(self.onset_sample / SAMPLE_RATE, 4)

    @property
    def offset(self) -> float:
        return round((self.onset_sample + self.length) / SAMPLE_RATE, 4)

    @property
    def duration(self) -> float:
        return round(self.length / SAMPLE_RATE, 4)


@dataclass(frozen=True)
class Bed:
    """Background: an optional looped ambience recording plus a low-level synthetic pink-noise floor."""

    label: str | None
    source_id: str | None
    source_start: int
    source_end: int
    loop_offset: int
    gain_db: float
    noise_db: float
    noise_seed: int


@dataclass
class Scene:
    """A planned scene; ``scale`` is the final peak-protection factor applied to the whole mix."""

    scene_id: str
    split: str
    events: list[Event]
    bed: Bed
    scale: float = 1.0
    extra: dict = field(default_factory=dict)

    def counts(self) -> Counter:
        return Counter(e.label for e in self.events)

    def labels(self, include_bed: bool = True) -> set[str]:
        labels = {e.label for e in self.events}
        if include_bed and self.bed.label:
            labels.add(self.bed.label)
        return labels


class ClipStore:
    """Decoded 16 kHz source clips by id, loaded lazily from the ``.npy`` cache and kept in memory."""

    def __init__(self, paths: Mapping[str, str | Path], synthetic: Mapping[str, np.ndarray] | None = None):
        self.paths = {k: Path(v) for k, v in paths.items()}
        self._arrays: dict[str, np.ndarray] = dict(synthetic or {})
        self._regions: dict[str, tuple[int, int]] = {}

    def __contains__(self, cid: str) -> bool:
        return cid in self._arrays or cid in self.paths

    def get(self, cid: str) -> np.ndarray:
        arr = self._arrays.get(cid)
        if arr is None:
            arr = np.load(self.paths[cid]).astype(np.float32, copy=False)
            self._arrays[cid] = arr
        return arr

    def region(self, cid: str) -> tuple[int, int]:
        reg = self._regions.get(cid)
        if reg is None:
            arr = self.get(cid)
            reg = active_region(arr) or (0, len(arr))
            self._regions[cid] = reg
        return reg


def synthetic_beeps(n: int = 10) -> dict[str, np.ndarray]:
    """Synthetic 'Beep, bleep' sources (numpy tone bursts) — the ontology's one synthetic class.

    Parameters are fixed (not seeded by the build) so sources and their split are stable.
    """
    out: dict[str, np.ndarray] = {}
    rng = np.random.default_rng(12345)
    for k in range(n):
        freq = float(rng.uniform(500, 3000))
        dur = float(rng.uniform(0.1, 0.5))
        reps = int(rng.integers(1, 4))
        gap = float(rng.uniform(0.08, 0.25))
        t = np.arange(int(dur * SAMPLE_RATE)) / SAMPLE_RATE
        tone = 0.5 * np.sin(2 * np.pi * freq * t)
        ramp = int(0.005 * SAMPLE_RATE)
        env = np.ones_like(tone)
        env[:ramp] = np.linspace(0, 1, ramp)
        env[-ramp:] = np.linspace(1, 0, ramp)
        burst = (tone * env).astype(np.float32)
        pieces = []
        for r in range(reps):
            pieces.append(burst)
            if r < reps - 1:
                pieces.append(np.zeros(int(gap * SAMPLE_RATE), np.float32))
        out[f"synthetic.beep_{k:02d}_{int(freq)}hz"] = np.concatenate(pieces)
    return out


def _rms_db(x: np.ndarray) -> float:
    return float(10 * np.log10(np.mean(x.astype(np.float64) ** 2) + 1e-12))


def _pick_excerpt(store: ClipStore, cid: str, rng: np.random.Generator) -> tuple[int, int] | None:
    """(start, length) of an energy-trimmed excerpt of at most ~1.5–5 s from a source's active region."""
    arr = store.get(cid)
    a, b = store.region(cid)
    max_len = int(rng.uniform(1.5, 5.0) * SAMPLE_RATE)
    if b - a > max_len:
        a = int(rng.integers(a, b - max_len + 1))
        b = a + max_len
        sub = active_region(arr[a:b])  # re-trim: the window may start or end in a pause
        if sub is None:
            return None
        a, b = a + sub[0], a + sub[1]
    if b - a < SAMPLE_RATE // 20:
        return None
    return a, b - a


def plan_scene(
    scene_id: str,
    split: str,
    pool: Mapping[str, Sequence[str]],
    beds: Mapping[str, Sequence[str]],
    store: ClipStore,
    rng: np.random.Generator,
) -> Scene:
    """Choose events, onsets, gains and a bed for one scene.

    ``pool`` maps class → source ids usable in this split; ``beds`` the same for ambience
    classes long enough to loop. Same-class occurrences never overlap (so counts are
    countable); different classes overlap in about a third of scenes.
    """
    bed_label, labels = _choose_labels(pool, beds, rng)
    allow_overlap = rng.random() < 0.33
    level_db = float(rng.uniform(-30.0, -16.0))
    events: list[Event] = []
    for label in labels:
        ev = _place_event(label, pool[label], len(labels), events, allow_overlap, level_db, store, rng)
        if ev is not None:
            events.append(ev)
    if not events:  # pathological pool; keep the scene valid with the first usable source
        raise RuntimeError(f"could not place any event in {scene_id}")
    bed, floor_db = _plan_bed(bed_label, beds, level_db, store, rng)
    events = [
        Event(e.label, e.source_id, e.source_start, e.length, e.onset_sample, e.gain_db,
              round(e.gain_db + _rms_db(store.get(e.source_id)[e.source_start:e.source_start + e.length]) - floor_db, 2))
        for e in sorted(events, key=lambda e: (e.onset_sample, e.label))
    ]
    scene = Scene(scene_id, split, events, bed)
    peak = float(np.max(np.abs(_mix(scene, store, None, True))))
    scene.scale = round(min(1.0, 0.9 / peak), 6) if peak > 0 else 1.0
    return scene


def _choose_labels(pool: Mapping[str, Sequence[str]], beds: Mapping[str, Sequence[str]],
                   rng: np.random.Generator) -> tuple[str | None, list[str]]:
    """The bed's class (or None) and the foreground events' classes: 1–4 events, never the bed's class, and
    in about a third of scenes one class repeated ("a dog barks three times")."""
    classes = sorted(pool)
    n_total = int(rng.choice(list(EVENT_COUNT_WEIGHTS), p=list(EVENT_COUNT_WEIGHTS.values())))
    # decide the bed first so foreground never repeats the bed's class
    bed_label = None
    bed_classes = sorted(beds)
    if bed_classes and rng.random() < 0.55:
        bed_label = bed_classes[int(rng.integers(len(bed_classes)))]
    fg = [c for c in classes if c != bed_label]
    n_distinct = n_total
    repeat = n_total >= 2 and rng.random() < 0.35
    if repeat:
        n_distinct = max(1, n_total - int(rng.integers(1, min(2, n_total - 1) + 1)))
    n_distinct = min(n_distinct, len(fg))
    chosen = [fg[i] for i in rng.choice(len(fg), size=n_distinct, replace=False)]
    labels = list(chosen)
    while len(labels) < n_total:
        labels.append(chosen[0])  # repeats go to one class: "a dog barks three times"
    return bed_label, labels


def _place_event(label: str, srcs: Sequence[str], n_total: int, events: Sequence[Event], allow_overlap: bool, level_db: float,
                 store: ClipStore, rng: np.random.Generator) -> Event | None:
    """One event of ``label``: an excerpt of one of its sources, placed among ``events`` (up to six tries, else None)."""
    for _ in range(6):
        cid = srcs[int(rng.integers(len(srcs)))]
        exc = _pick_excerpt(store, cid, rng)
        if exc is None:
            continue
        start, length = exc
        length = min(length, int(SCENE_S * SAMPLE_RATE) // max(2, n_total))  # leave room for the others
        # a cut length may end inside a pause: re-trim so the offset stays tight
        sub = active_region(store.get(cid)[start:start + length])
        if sub is None or sub[1] - sub[0] < SAMPLE_RATE // 20:
            continue
        start, length = start + sub[0], sub[1] - sub[0]
        onset = _place(length, label, events, allow_overlap, rng)
        if onset is None:
            continue
        src_db = _rms_db(store.get(cid)[start:start + length])
        ev_level = level_db + float(rng.uniform(-4.0, 4.0))
        return Event(label, cid, start, length, onset, round(ev_level - src_db, 3), 0.0)
    return None


def _plan_bed(bed_label: str | None, beds: Mapping[str, Sequence[str]], level_db: float, store: ClipStore,
              rng: np.random.Generator) -> tuple[Bed, float]:
    """The background bed (``bed_label``'s, looped, 6–24 dB under the events) or only the noise floor, and the
    level in dB the events' SNRs are measured against."""
    snr = float(rng.uniform(6.0, 24.0))
    bed_db = level_db - snr
    noise_db = float(rng.uniform(-62.0, -50.0))
    if bed_label is not None:
        bid = beds[bed_label][int(rng.integers(len(beds[bed_label])))]
        a, b = store.region(bid)
        src_db = _rms_db(store.get(bid)[a:b])
        bed = Bed(bed_label, bid, a, b, int(rng.integers(0, b - a)), round(bed_db - src_db, 3), round(noise_db, 2),
                  int(rng.integers(2**31)))
        return bed, bed_db
    return Bed(None, None, 0, 0, 0, 0.0, round(noise_db, 2), int(rng.integers(2**31))), noise_db


def _place(length: int, label: str, events: Sequence[Event], allow_overlap: bool, rng: np.random.Generator) -> int | None:
    total = int(SCENE_S * SAMPLE_RATE)
    if length >= total:
        return None
    gap = int(0.15 * SAMPLE_RATE)  # same-class repeats stay audibly separate
    for _ in range(60):
        onset = int(rng.integers(0, total - length))
        ok = True
        for e in events:
            overlap = onset < e.onset_sample + e.length + gap and e.onset_sample < onset + length + gap
            if overlap and (e.label == label or not allow_overlap):
                ok = False
                break
        if ok:
            return onset
    return None


def _pink_noise(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.arange(len(spec))
    spec[1:] /= np.sqrt(f[1:])
    spec[0] = 0
    x = np.fft.irfft(spec, n)
    return (x / (np.sqrt(np.mean(x**2)) + 1e-12)).astype(np.float32)


def loop_to_length(x: np.ndarray, n: int, offset: int) -> np.ndarray:
    """Loop ``x`` to ``n`` samples from ``offset`` with short cross-fades, so beds never drop out."""
    fade = min(int(0.05 * SAMPLE_RATE), len(x) // 4)
    if len(x) - offset >= n:
        return x[offset:offset + n].astype(np.float32, copy=True)
    head = x[offset:] if len(x) - offset >= 2 * fade + 1 else x
    out = np.zeros(n + len(x) + len(head), np.float32)
    out[:len(head)] = head
    pos = len(head)
    ramp = np.linspace(0, 1, fade, dtype=np.float32)
    while pos < n:
        piece = x.astype(np.float32, copy=True)
        if fade:
            piece[:fade] *= ramp
            out[pos - fade:pos] *= ramp[::-1]
        out[pos - fade:pos - fade + len(piece)] += piece
        pos += len(piece) - fade
    return out[:n]


def render(scene: Scene, store: ClipStore, only: Sequence[int] | None = None, bed: bool = True) -> np.ndarray:
    """Render a planned scene (or just the events at indices ``only``) to 10 s of 16 kHz float32."""
    return (_mix(scene, store, only, bed) * scene.scale).astype(np.float32)


def _mix(scene: Scene, store: ClipStore, only: Sequence[int] | None, bed: bool) -> np.ndarray:
    n = int(SCENE_S * SAMPLE_RATE)
    mix = np.zeros(n, np.float64)
    if bed and only is None:
        mix += _pink_noise(n, scene.bed.noise_seed) * 10 ** (scene.bed.noise_db / 20)
        if scene.bed.source_id is not None:
            src = store.get(scene.bed.source_id)[scene.bed.source_start:scene.bed.source_end]
            mix += loop_to_length(src, n, scene.bed.loop_offset) * 10 ** (scene.bed.gain_db / 20)
    fade = int(FADE_S * SAMPLE_RATE)
    for i, e in enumerate(scene.events):
        if only is not None and i not in only:
            continue
        x = store.get(e.source_id)[e.source_start:e.source_start + e.length].astype(np.float64)
        if len(x) > 4 * fade:  # 5 ms fades stop clicks; they sit inside the labelled span
            ramp = np.linspace(0.0, 1.0, fade)
            x = x.copy()
            x[:fade] *= ramp
            x[-fade:] *= ramp[::-1]
        mix[e.onset_sample:e.onset_sample + len(x)] += x * 10 ** (e.gain_db / 20)
    return mix


def scene_to_json(scene: Scene) -> dict:
    """Everything needed to re-render the scene, plus AudioTime-style summaries (order, counts, durations)."""
    events = [
        {"label": e.label, "onset": e.onset, "offset": e.offset, "duration": e.duration, "source_id": e.source_id,
         "source_start": e.source_start, "length": e.length, "onset_sample": e.onset_sample,
         "gain_db": e.gain_db, "snr_db": e.snr_db}
        for e in scene.events
    ]
    order: list[str] = []
    for e in scene.events:
        if e.label not in order:
            order.append(e.label)
    durations: dict[str, float] = {}
    for e in scene.events:
        durations[e.label] = round(durations.get(e.label, 0.0) + e.duration, 3)
    return {
        "scene_id": scene.scene_id, "split": scene.split, "duration": SCENE_S, "sample_rate": SAMPLE_RATE,
        "events": events, "background": asdict(scene.bed), "scale": scene.scale,
        "ordering": order, "counts": dict(scene.counts()), "durations": durations,
    }


def scene_from_json(d: Mapping) -> Scene:
    """Inverse of :func:`scene_to_json` (ignores derived summaries)."""
    events = [Event(e["label"], e["source_id"], int(e["source_start"]), int(e["length"]), int(e["onset_sample"]),
                    float(e["gain_db"]), float(e["snr_db"])) for e in d["events"]]
    return Scene(d["scene_id"], d["split"], events, Bed(**d["background"]), float(d["scale"]))
