"""Captions and question/answer rows for mixed scenes, in the phrasings public benchmarks use.

Presence questions follow the hallucination benchmarks ("Is there a sound of X in the
audio?", "Did you hear X in the audio? Answer with yes or no.") with absent X drawn three
ways, as in POPE-style evaluation: random, popular (the corpus' most frequent classes) and
adversarial (confusable siblings and typical co-occurrences of what is present).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from train.data.ontology import Ontology

PRESENCE_TEMPLATES = (
    "Is there a sound of {x} in the audio?",
    "Did you hear {x} in the audio? Answer with yes or no.",
)
# Presence phrasings by family, for the phrasing a person uses (the served guard reads every one of them, see
# ``models.questions.read_presence``): the stages learn the ``train`` templates, the ``held_out`` ones are only
# asked in evaluation, so a model that learnt a template and not the question shows it there.
PRESENCE_FAMILIES: dict[str, dict[str, tuple[str, ...]]] = {
    "is there": {"train": ("Is there a sound of {x} in the audio?", "Is there {x} in this recording?"),
                 "held_out": ("Is there {x} somewhere in this clip?",)},
    "are there": {"train": ("Are there any sounds of {x}?",), "held_out": ("Are there sounds of {x} in the recording?",)},
    "do you hear": {"train": ("Do you hear {x}?",), "held_out": ("Do you hear {x} in the clip?",)},
    "did you hear": {"train": ("Did you hear {x} in the audio? Answer with yes or no.",), "held_out": ("Did you hear {x}?",)},
    "can you hear": {"train": ("Can you hear {x}?",), "held_out": ("Can you hear {x} in this audio?",)},
    "is X audible": {"train": ("Is {x} audible?",), "held_out": ("Is {x} audible in the recording?",)},
    "X in this clip": {"train": ("{x} in this clip?",), "held_out": ("{x} in the recording?",)},
}


def presence_question(template: str, phrase: str) -> str:
    """A presence template filled in, its first letter a capital ("A dog barking in this clip?")."""
    text = template.format(x=phrase)
    return text[0].upper() + text[1:]


def paraphrased(rows: Sequence["QARow"], seed: int = 0) -> list["QARow"]:
    """Each presence row asked in one of the families' training phrasings (seeded): the phrasing is taught, not one template."""
    rng = np.random.default_rng(seed)
    templates = [t for family in PRESENCE_FAMILIES.values() for t in family["train"]]
    return [replace(r, question=presence_question(_pick(rng, templates), r.phrase)) if r.kind == "presence" and r.phrase else r
            for r in rows]


ORDER_TEMPLATES = ("Which comes first, {x} or {y}?", "Does {x} happen before {y}?")
COUNT_TEMPLATE = "How many times do you hear {x}?"
DURATION_TEMPLATE = "How long does the sound of {x} last, in seconds?"
CAPTION_PROMPTS = ("Describe the audio in detail.", "Generate a caption for the audio.")
ORDERED_CAPTION_PROMPT = "Describe the sounds in the audio in the order they occur."
NUMBER_WORDS = {1: "once", 2: "twice", 3: "three times", 4: "four times", 5: "five times"}
GENERIC_PHRASES = 2  # phrases[:2] hold for every source of a class; later ones are specific
NEGATIVE_SAMPLINGS = ("random", "popular", "adversarial")  # how absent sounds are picked
SAMPLINGS = ("positive", *NEGATIVE_SAMPLINGS)


@dataclass(frozen=True)
class QARow:
    """One question about one scene; ``audio`` is relative to the corpus directory."""

    scene_id: str
    split: str
    audio: str
    question: str
    answer: str
    kind: str  # presence | order | count | duration | caption
    sampling: str  # positive | random | popular | adversarial
    label: str | None  # the event class asked about (None for captions)
    phrase: str | None = None
    other_label: str | None = None  # second event of an order question


@dataclass(frozen=True)
class Group:
    """All occurrences of one class in a scene, in onset order."""

    label: str
    spans: tuple[tuple[float, float], ...]

    @property
    def first_onset(self) -> float:
        return self.spans[0][0]

    @property
    def last_offset(self) -> float:
        return max(b for _, b in self.spans)


def groups(timeline: Mapping) -> list[Group]:
    """Foreground events grouped by class, ordered by first onset."""
    spans: dict[str, list[tuple[float, float]]] = {}
    for e in sorted(timeline["events"], key=lambda e: (e["onset"], e["label"])):
        spans.setdefault(e["label"], []).append((float(e["onset"]), float(e["offset"])))
    return sorted((Group(k, tuple(v)) for k, v in spans.items()), key=lambda g: (g.first_onset, g.label))


def _clause(onto: Ontology, g: Group, count: int | None = None) -> str:
    n = len(g.spans) if count is None else count
    base = onto[g.label].caption
    return base if n == 1 else f"{base} {NUMBER_WORDS.get(n, f'{n} times')}"


def caption_from_groups(onto: Ontology, gs: Sequence[Group], background: str | None,
                        counts: Mapping[str, int] | None = None, labels: Sequence[str] | None = None) -> str:
    """Name events in temporal order: 'A dog barks twice, then a door opens, while someone speaks.'

    ``counts``/``labels`` override a group's count or class (used to write counterfactuals).
    """
    parts: list[str] = []
    prev_end = -1.0
    for i, g in enumerate(gs):
        shown = Group(labels[i], g.spans) if labels is not None else g
        clause = _clause(onto, shown, None if counts is None else counts.get(g.label))
        if i == 0:
            parts.append(clause[0].upper() + clause[1:])
        else:
            parts.append(("while " if g.first_onset < prev_end else "then ") + clause)
        prev_end = max(prev_end, g.last_offset)
    text = ", ".join(parts)
    if background:
        text += f", with {onto[background].phrases[0]} in the background"
    return text + "."


def caption(onto: Ontology, timeline: Mapping) -> str:
    """The scene's reference caption."""
    return caption_from_groups(onto, groups(timeline), (timeline.get("background") or {}).get("label"))


def popular_classes(timelines: Iterable[Mapping], k: int = 10) -> list[str]:
    """The k most frequent classes (events and beds) — the pool for 'popular' negatives."""
    c: Counter = Counter()
    for t in timelines:
        c.update({e["label"] for e in t["events"]})
        bg = (t.get("background") or {}).get("label")
        if bg:
            c[bg] += 1
    return [name for name, _ in sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))[:k]]


def absent_candidates(onto: Ontology, present: set[str], sampling: str, popular: Sequence[str],
                      available: Sequence[str]) -> list[str]:
    """Classes absent from the scene for one sampling strategy (sorted for determinism)."""
    if sampling == "random":
        pool = set(available)
    elif sampling == "popular":
        pool = set(popular)
    elif sampling == "adversarial":
        pool = set()
        for p in present:
            pool.update(onto[p].siblings)
            pool.update(onto[p].cooccurs)
    else:
        raise ValueError(sampling)
    return sorted(pool - present)


def _pick(rng: np.random.Generator, items: Sequence):
    return items[int(rng.integers(len(items)))]


def scene_questions(onto: Ontology, scene_id: str, split: str, audio: str, timeline: Mapping,
                    popular: Sequence[str], available: Sequence[str], rng: np.random.Generator) -> list[QARow]:
    """Questions for one scene: presence (positive + 3 negative samplings), order, count, duration, caption."""
    rows: list[QARow] = []
    gs = groups(timeline)
    bg = (timeline.get("background") or {}).get("label")
    present = {g.label for g in gs} | ({bg} if bg else set())

    def row(q: str, a: str, kind: str, sampling: str, label: str | None, phrase: str | None = None,
            other: str | None = None) -> None:
        rows.append(QARow(scene_id, split, audio, q, a, kind, sampling, label, phrase, other))

    for label in sorted(present):
        phrase = _pick(rng, onto[label].phrases[:GENERIC_PHRASES])
        row(_pick(rng, PRESENCE_TEMPLATES).format(x=phrase), "Yes", "presence", "positive", label, phrase)
    for sampling in NEGATIVE_SAMPLINGS:
        cands = absent_candidates(onto, present, sampling, popular, available)
        if not cands:
            continue
        label = _pick(rng, cands)
        # the same generic phrases as positives: a specific phrase only ever asked of absent
        # sounds would let the wording, not the audio, give the answer away
        phrase = _pick(rng, onto[label].phrases[:GENERIC_PHRASES])
        row(_pick(rng, PRESENCE_TEMPLATES).format(x=phrase), "No", "presence", sampling, label, phrase)
    singles = [g for g in gs if len(g.spans) == 1]
    ordered = [(a, b) for i, a in enumerate(singles) for b in singles[i + 1:] if a.last_offset <= b.first_onset]
    if ordered:
        a, b = _pick(rng, ordered)
        pa, pb = onto[a.label].phrases[0], onto[b.label].phrases[0]
        x, y = (pa, pb) if rng.random() < 0.5 else (pb, pa)
        row(ORDER_TEMPLATES[0].format(x=x, y=y), pa[0].upper() + pa[1:] + ".", "order", "positive", a.label, pa, b.label)
        x, y, ans = (pa, pb, "Yes") if rng.random() < 0.5 else (pb, pa, "No")
        row(ORDER_TEMPLATES[1].format(x=x, y=y), ans, "order", "positive", a.label, pa, b.label)
    for g in gs:
        phrase = onto[g.label].phrases[0]
        row(COUNT_TEMPLATE.format(x=phrase), str(len(g.spans)), "count", "positive", g.label, phrase)
    for g in singles:
        phrase = onto[g.label].phrases[0]
        dur = g.spans[0][1] - g.spans[0][0]
        row(DURATION_TEMPLATE.format(x=phrase), f"{dur:.1f}", "duration", "positive", g.label, phrase)
    row(_pick(rng, CAPTION_PROMPTS), caption(onto, timeline), "caption", "positive", None)
    return rows


def write_qa_jsonl(path: str | Path, rows: Iterable[QARow]) -> int:
    """One JSON object per line; returns how many were written."""
    n = 0
    with Path(path).open("w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(asdict(r), ensure_ascii=False, sort_keys=True) + "\n")
            n += 1
    return n


def read_qa_rows(corpus_dir: str | Path, split: str, absolute_audio: bool = False) -> list[QARow]:
    """Read ``DIR/qa/<split>.jsonl``; with ``absolute_audio`` the audio paths are resolved against DIR."""
    base = Path(corpus_dir)
    out = []
    with (base / "qa" / f"{split}.jsonl").open(encoding="utf-8") as fh:
        for line in fh:
            d = json.loads(line)
            if absolute_audio:
                d["audio"] = str((base / d["audio"]).resolve())
            out.append(QARow(**d))
    return out
