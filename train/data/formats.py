"""Readers and writers for the public audio-text formats the corpus speaks.

* AudioCaps CSV: ``audiocap_id,youtube_id,start_time,caption``
* Clotho captions CSV: ``file_name,caption_1..caption_5``
* AudioSet strong TSV: ``segment_id<TAB>start_time_seconds<TAB>end_time_seconds<TAB>label``
  (AudioSet itself puts MIDs in ``label``; this corpus writes display names, and
  :func:`read_strong_tsv` can map MIDs back to names with ``mid_to_name``)
* AudioTime-style JSON: ``{id: {caption, events: [{label, onset, offset, ...}], ordering, counts, durations}}``

Readers return plain dataclasses so evaluation code can mix public sets with our own scenes.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class CaptionRow:
    """One (audio, caption) pair from AudioCaps or Clotho."""

    audio_id: str
    caption: str
    start_time: float | None = None


@dataclass(frozen=True)
class StrongLabel:
    """One strongly labelled event: a label active from ``start`` to ``end`` seconds in a segment."""

    segment_id: str
    start: float
    end: float
    label: str


def read_audiocaps_csv(path: str | Path) -> list[CaptionRow]:
    """AudioCaps rows; audio id is ``<youtube_id>_<start_time>`` like the released clips."""
    out = []
    with Path(path).open(newline="", encoding="utf-8") as fh:
        for r in csv.DictReader(fh):
            start = float(r["start_time"]) if r.get("start_time") not in (None, "") else None
            out.append(CaptionRow(f"{r['youtube_id']}_{int(start) if start is not None else 0}", r["caption"].strip(), start))
    return out


def write_audiocaps_csv(path: str | Path, rows: Iterable[tuple[str, str, float, str]]) -> None:
    """Write ``(audiocap_id, youtube_id, start_time, caption)`` tuples."""
    with Path(path).open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["audiocap_id", "youtube_id", "start_time", "caption"])
        w.writerows(rows)


def read_clotho_csv(path: str | Path) -> list[CaptionRow]:
    """Clotho captions: one row per file with ``caption_1``..``caption_5``; flattened to pairs."""
    out = []
    with Path(path).open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        cols = sorted((c for c in reader.fieldnames or [] if c.startswith("caption_")), key=lambda c: int(c.split("_")[1]))
        for r in reader:
            out.extend(CaptionRow(r["file_name"], r[c].strip()) for c in cols if r.get(c, "").strip())
    return out


def write_clotho_csv(path: str | Path, captions: Mapping[str, list[str]]) -> None:
    """Write ``file_name → [captions]`` (padded/truncated to five, as Clotho ships them)."""
    with Path(path).open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["file_name"] + [f"caption_{i}" for i in range(1, 6)])
        for name, caps in captions.items():
            caps = (list(caps) + [""] * 5)[:5]
            w.writerow([name, *caps])


STRONG_HEADER = ["segment_id", "start_time_seconds", "end_time_seconds", "label"]


def write_strong_tsv(path: str | Path, labels: Iterable[StrongLabel]) -> None:
    """AudioSet-strong style TSV with a header row; times rounded to milliseconds."""
    with Path(path).open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, delimiter="\t", lineterminator="\n")
        w.writerow(STRONG_HEADER)
        for s in labels:
            w.writerow([s.segment_id, f"{s.start:.3f}", f"{s.end:.3f}", s.label])


def read_strong_tsv(path: str | Path, mid_to_name: Mapping[str, str] | None = None) -> list[StrongLabel]:
    """Read AudioSet strong TSVs (ours or the released ones); MIDs map to names when a map is given."""
    out = []
    with Path(path).open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh, delimiter="\t")
        missing = set(STRONG_HEADER) - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: not an AudioSet strong TSV (missing columns {sorted(missing)})")
        for r in reader:
            label = r["label"]
            if mid_to_name and label in mid_to_name:
                label = mid_to_name[label]
            out.append(StrongLabel(r["segment_id"], float(r["start_time_seconds"]), float(r["end_time_seconds"]), label))
    return out


def write_audiotime_json(path: str | Path, timelines: Mapping[str, Mapping]) -> None:
    """Scene id → timeline (caption, events with onset/offset, ordering, counts, durations)."""
    Path(path).write_text(json.dumps(timelines, indent=1, ensure_ascii=False, sort_keys=True), encoding="utf-8")


def read_audiotime_json(path: str | Path) -> dict[str, dict]:
    """Read an AudioTime-style JSON; validates that every event has label/onset/offset and onset ≤ offset."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected an object keyed by audio id")
    for key, t in data.items():
        for e in t.get("events", []):
            if not {"label", "onset", "offset"} <= set(e) or float(e["onset"]) > float(e["offset"]):
                raise ValueError(f"{path}: malformed event in {key}: {e}")
    return data


def read_timelines(corpus: str | Path, split: str) -> dict[str, dict]:
    """A corpus split's timelines (``scenes/<split>/timelines.json``), validated."""
    return read_audiotime_json(Path(corpus) / "scenes" / split / "timelines.json")


def timeline_strong_labels(scene_id: str, timeline: Mapping, include_background: bool = True) -> list[StrongLabel]:
    """Strong labels of one timeline: each event, plus the background bed spanning the scene."""
    out = [StrongLabel(scene_id, float(e["onset"]), float(e["offset"]), e["label"]) for e in timeline["events"]]
    bg = timeline.get("background") or {}
    if include_background and bg.get("label"):
        out.append(StrongLabel(scene_id, 0.0, float(timeline.get("duration", 10.0)), bg["label"]))
    return sorted(out, key=lambda s: (s.start, s.label))
