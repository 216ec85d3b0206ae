"""The sound-class ontology the corpus, the trainer and the hallucination guard share.

Classes carry AudioSet display names (and MIDs only where known with confidence), how their
audio was made (real / sampled / foley / synthetic), natural phrases for questions, and
confusable siblings so adversarial "absent sound" questions are genuinely hard.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache

from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent
KINDS = ("real", "sampled", "foley", "synthetic")


@dataclass(frozen=True)
class SoundClass:
    """One ontology class; ``phrases[0]`` is the canonical phrase used in questions."""

    name: str
    mid: str | None
    kind: str
    group: str
    phrases: tuple[str, ...]
    caption: str
    siblings: tuple[str, ...]
    cooccurs: tuple[str, ...]
    bed: bool

    def to_dict(self) -> dict:
        return {
            "name": self.name, "mid": self.mid, "kind": self.kind, "group": self.group,
            "phrases": list(self.phrases), "caption": self.caption, "siblings": list(self.siblings),
            "cooccurs": list(self.cooccurs), "bed": self.bed,
        }


@dataclass(frozen=True)
class Ontology:
    """Ordered classes with name lookup; ordering is stable so label indices are too."""

    classes: tuple[SoundClass, ...]

    def __post_init__(self) -> None:
        names = [c.name for c in self.classes]
        if len(set(names)) != len(names):
            raise ValueError("duplicate class names in ontology")
        known = set(names)
        for c in self.classes:
            if c.kind not in KINDS:
                raise ValueError(f"{c.name}: kind {c.kind!r} not in {KINDS}")
            bad = [s for s in (*c.siblings, *c.cooccurs) if s not in known]
            if bad:
                raise ValueError(f"{c.name}: unknown related classes {bad}")

    def __getitem__(self, name: str) -> SoundClass:
        return self.by_name[name]

    def __iter__(self):
        return iter(self.classes)

    def __len__(self) -> int:
        return len(self.classes)

    def __contains__(self, name: object) -> bool:
        return name in self.by_name

    @property
    def by_name(self) -> dict[str, SoundClass]:
        return {c.name: c for c in self.classes}

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.classes]

    def to_json(self) -> dict:
        return {"version": 1, "classes": [c.to_dict() for c in self.classes]}


def _from_doc(doc: dict) -> Ontology:
    return Ontology(tuple(
        SoundClass(
            name=c["name"], mid=c.get("mid"), kind=c["kind"], group=c["group"],
            phrases=tuple(c["phrases"]), caption=c["caption"], siblings=tuple(c.get("siblings", ())),
            cooccurs=tuple(c.get("cooccurs", ())), bed=bool(c.get("bed", False)),
        )
        for c in doc["classes"]
    ))


@lru_cache(maxsize=4)
def load_ontology(path: str | Path | None = None) -> Ontology:
    """Load the project ontology (``train/data/ontology.json``) or a corpus' ``ontology.json``."""
    if path is None:
        text = (DATA_DIR / "ontology.json").read_text(encoding="utf-8")
    else:
        text = Path(path).read_text(encoding="utf-8")
    return _from_doc(json.loads(text))
