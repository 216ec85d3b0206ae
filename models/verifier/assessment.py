"""What the verifier answers about a clip, as typed values (no dicts read by key): each phrase's score
(:class:`EventScore`) and the one answer the guard gets per request (:class:`Assessment`). Light (no torch), so the
ingress reads them without loading a network."""

from __future__ import annotations

from dataclasses import dataclass, field

from models.verifier.text import Match

SAMPLE_RATE = 16_000  # every verifier hears clips at this rate: its callers decode to it


@dataclass
class EventScore:
    text: str
    event: str | None  # matched ontology class
    similarity: float  # text ↔ nearest class
    probability: float  # calibrated presence probability (of the free text when no class matched)
    present: bool | None  # None: between the thresholds, or not judged (``reason``)
    nearest: str | None = None  # the closest class, close enough or not
    reason: str | None = None  # outside_ontology: no class matched, so not judged
    vocabulary: str | None = None  # where ``event`` comes from: "ontology" (the trained classes) or "audioset" (the tagger's own)

    def to_dict(self) -> dict:
        return {"text": self.text, "event": self.event, "nearest": self.nearest, "similarity": round(self.similarity, 4),
                "probability": round(self.probability, 4), "present": self.present, "reason": self.reason,
                "vocabulary": self.vocabulary}


@dataclass(frozen=True)
class Assessment:
    """The verifier's answer for one guarded request: every class's calibrated probability on the clip, the asked
    targets scored (:meth:`~models.verifier.verifiers.Verifier.score`, not judged), the answer's mentions placed on the
    ontology (a mention is judged by its class's probability), and the thresholds the guard judges them with."""

    probabilities: dict[str, float]
    targets: list[EventScore]
    absent_below: float
    present_above: float
    mentions: list[Match] = field(default_factory=list)
    kept: bool = False  # the probabilities came from the replica's kept results: no audio forward
    shared: bool = False  # scored from the served model's tower layers: no encoder pass of its own
