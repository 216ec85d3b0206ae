"""The sounds the verifier hears, with their times, and those detections said in words.

A verifier's :class:`Timeline` is its calibrated probability of each class per frame (the per-frame scores its clip
score is pooled from) and its clip probability. A class is *detected* when its clip probability reaches the
verifier's ``present_above`` (the very judgement ``/v1/audio/verify`` and the guard make); its spans are the runs of
frames at or above that threshold, gaps up to ``min_gap_s`` filled (a bird's pauses between calls are one event),
clipped to the clip. :func:`describe` turns them into the sentence an open question is answered with.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

SOURCE = "from the sound-event verifier"  # how a description says where it came from: not the language model


@dataclass(frozen=True)
class Timeline:
    """One vocabulary's classes over one clip: calibrated probability per frame and per clip."""

    vocabulary: str  # "ontology" (the verifier's trained classes) or "audioset" (the tagger's own 521)
    names: list[str]
    starts: np.ndarray  # [T] seconds
    ends: np.ndarray  # [T]
    probs: np.ndarray  # [C, T]
    clip: np.ndarray  # [C]
    threshold: float  # the verifier's own "present" point for this vocabulary
    phrases: list[str] = field(default_factory=list)  # how a sentence names each class (default: its name)


@dataclass(frozen=True)
class Detection:
    event: str
    vocabulary: str
    phrase: str  # the words a description uses for it
    probability: float  # the clip's calibrated probability (what /v1/audio/verify reports for the class)
    peak: float  # the highest frame probability
    spans: list[tuple[float, float]]  # (onset, offset) seconds

    def to_dict(self) -> dict:
        return {"event": self.event, "vocabulary": self.vocabulary, "phrase": self.phrase, "probability": round(self.probability, 4),
                "peak": round(self.peak, 4), "spans": [{"onset_s": round(a, 2), "offset_s": round(b, 2)} for a, b in self.spans]}


@dataclass(frozen=True)
class EventReport:
    """What ``VerifierServer.events`` answers: the detections over one clip and the thresholds that made them."""

    verifier: str
    detections: list[Detection]
    thresholds: dict[str, float]  # per vocabulary
    duration_s: float
    kept: bool = False  # computed for an earlier request of the same clip

    def describe(self) -> str:
        return describe(self.detections, self.duration_s)

    def named(self) -> tuple[str, ...]:
        """The classes :meth:`describe` names."""
        return tuple(d.event for d in named_detections(self.detections))


def active_spans(starts: np.ndarray, ends: np.ndarray, active: np.ndarray, min_gap_s: float, duration_s: float) -> list[tuple[float, float]]:
    """Runs of active frames as ``(onset, offset)`` seconds: overlapping or touching frames join, and so do runs
    separated by at most ``min_gap_s``; each span is clipped to ``[0, duration_s]``."""
    spans: list[list[float]] = []
    for a, b in sorted(zip(starts[active].tolist(), ends[active].tolist())):
        if spans and a - spans[-1][1] <= min_gap_s:
            spans[-1][1] = max(spans[-1][1], b)
        else:
            spans.append([a, b])
    clipped = [(max(0.0, a), min(duration_s, b)) for a, b in spans]
    return [(a, b) for a, b in clipped if b > a]


def detect(timeline: Timeline, min_gap_s: float, duration_s: float, threshold: float | None = None) -> list[Detection]:
    """The timeline's classes whose clip probability reaches ``threshold`` (None: the timeline's own), with their spans,
    most probable first.

    A class judged present whose frames all stay below the threshold (a sound spread thinly over the clip) gets the
    span of its most probable frame, so that a detection always says where it was heard."""
    threshold = timeline.threshold if threshold is None else threshold
    out = []
    for c in np.flatnonzero(timeline.clip >= threshold):
        probs = timeline.probs[c]
        active = probs >= threshold
        if not active.any():
            active = probs == probs.max()
        spans = active_spans(timeline.starts, timeline.ends, active, min_gap_s, duration_s)
        phrase = timeline.phrases[c] if timeline.phrases else timeline.names[c]
        out.append(Detection(timeline.names[c], timeline.vocabulary, phrase, float(timeline.clip[c]), float(probs.max()), spans))
    return sorted(out, key=lambda d: -d.probability)


def _when(d: Detection, duration_s: float, whole: float = 0.9) -> str:
    """`` (0.2–2.1 s)``, or nothing for a sound heard over (nearly) the whole clip."""
    heard = sum(b - a for a, b in d.spans)
    if not d.spans or heard >= whole * duration_s:
        return ""
    return " (" + ", ".join(f"{a:.1f}–{b:.1f} s" for a, b in d.spans[:3]) + (", …" if len(d.spans) > 3 else "") + ")"


def named_detections(detections: list[Detection], most: int = 5) -> list[Detection]:
    """The detections a description names: the trained classes' (the ontology's, whose threshold was chosen for
    event-level F1), or, when none is heard, the AudioSet vocabulary's (judged by the tagger alone, weaker evidence);
    one per phrase, the ``most`` most probable."""
    trained = [d for d in detections if d.vocabulary == "ontology"]
    seen: dict[str, Detection] = {}
    for d in trained or detections:
        seen.setdefault(d.phrase.lower(), d)
    return list(seen.values())[:most]


def describe(detections: list[Detection], duration_s: float, most: int = 5) -> str:
    """The detections in one sentence, saying where it came from: "I hear birdsong (0.2–2.1 s) and crickets (from the
    sound-event verifier)." At most ``most`` sounds (:func:`named_detections`); a sound heard throughout gets no times."""
    parts = [d.phrase + _when(d, duration_s) for d in named_detections(detections, most)]
    if not parts:
        return f"I hear no sound I can name ({SOURCE})."
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"I hear {listed} ({SOURCE})."
