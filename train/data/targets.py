"""Label targets from a scene's strong labels (its timeline: events by onset and offset, the background bed
throughout), written once for every stage and evaluation that learns or scores what sounds when: per audio-token
position (:func:`frame_targets`), per analysis patch (:func:`patch_targets`) or per window (:func:`window_targets`)."""

from __future__ import annotations

import math

import numpy as np


def frame_targets(timelines: dict, rows_of: dict[str, int], classes: list[str], positions: int, clip_s: float) -> np.ndarray:
    """``[N, positions, classes]`` activity of each class at each audio-token position."""
    index = {name: i for i, name in enumerate(classes)}
    out = np.zeros((len(rows_of), positions, len(classes)), dtype=np.float32)
    step = clip_s / positions
    for scene_id, row in rows_of.items():
        t = timelines[scene_id]
        for e in t["events"]:
            a = int(math.floor(e["onset"] / step))
            b = int(math.ceil(e["offset"] / step))
            out[row, max(0, a) : min(positions, max(b, a + 1)), index[e["label"]]] = 1.0
        bed = (t.get("background") or {}).get("label")
        if bed:
            out[row, :, index[bed]] = 1.0
    return out


def patch_targets(timelines: dict, rows_of: dict[str, int], classes: list[str], patches: int, patch_s: float, hop_s: float) -> np.ndarray:
    """``[N, patches, classes]`` activity per analysis patch (``[k·hop_s, k·hop_s + patch_s]``), by :func:`window_targets`."""
    return window_targets(timelines, rows_of, classes, np.arange(patches) * hop_s, patch_s)


def window_targets(timelines: dict, rows_of: dict[str, int], classes: list[str], starts: np.ndarray, length: float) -> np.ndarray:
    """``[N, windows, classes]`` activity per window ``[start, start + length]``: a class is on when its events overlap
    the window by at least half their length or 0.1 s, whichever is less (a 0.2 s knock counts in every window that
    holds most of it)."""
    index = {name: i for i, name in enumerate(classes)}
    starts = np.asarray(starts, dtype=np.float64)
    out = np.zeros((len(rows_of), len(starts), len(classes)), dtype=np.float32)
    for scene_id, row in rows_of.items():
        t = timelines[scene_id]
        for e in t["events"]:
            overlap = np.minimum(starts + length, e["offset"]) - np.maximum(starts, e["onset"])
            out[row, overlap >= min(0.1, 0.5 * (e["offset"] - e["onset"])), index[e["label"]]] = 1.0
        bed = (t.get("background") or {}).get("label")
        if bed:
            out[row, :, index[bed]] = 1.0
    return out
