"""Preference pairs against hallucinated sounds: LISTEN, AHA and ACPO, saved for trl.

* LISTEN: synthesized negatives — a question about an absent sound; chosen says "no".
* AHA: counterfactual hard negatives from the strong timeline, four kinds: event omission,
  false event identity, temporal relation error, quantitative temporal error.
* ACPO: output-contrastive (same audio, right vs wrong answer) and input-contrastive pairs
  (same prompt and answer; the rejected side is *another scene that lacks the event*, stored
  in ``rejected_audio``), which punishes answers that ignore the audio.

Every pair has the columns ``prompt, chosen, rejected, audio, rejected_audio, kind, scene_id,
split``; audio paths are relative to the corpus directory.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from train.data.ontology import Ontology
from train.data.qa import (
    COUNT_TEMPLATE, DURATION_TEMPLATE, GENERIC_PHRASES, NUMBER_WORDS, ORDER_TEMPLATES, ORDERED_CAPTION_PROMPT, PRESENCE_TEMPLATES,
    QARow, caption_from_groups, groups,
)

KINDS = (
    "listen_absent",
    "aha_event_omission",
    "aha_false_event_identity",
    "aha_temporal_relation_error",
    "aha_quantitative_temporal_error",
    "acpo_output_contrastive",
    "acpo_input_contrastive",
)
COLUMNS = ("prompt", "chosen", "rejected", "audio", "rejected_audio", "kind", "scene_id", "split")


@dataclass(frozen=True)
class Pair:
    """One preference pair (columns exactly as the trainer reads them)."""

    prompt: str
    chosen: str
    rejected: str
    audio: str
    rejected_audio: str | None
    kind: str
    scene_id: str
    split: str


class QuestionWriter(Protocol):
    """Hook for LISTEN question phrasings: given a class and a natural phrase, return a question.

    The default uses benchmark templates; an LLM-backed writer can be passed to
    :func:`build_pairs` (it must be deterministic for a given ``rng`` to keep builds reproducible).
    """

    def __call__(self, label: str, phrase: str, rng: np.random.Generator) -> str: ...


def template_writer(label: str, phrase: str, rng: np.random.Generator) -> str:
    """Default :class:`QuestionWriter`: the public benchmark presence phrasings."""
    return PRESENCE_TEMPLATES[int(rng.integers(len(PRESENCE_TEMPLATES)))].format(x=phrase)


def _yes(phrase: str) -> str:
    return f"Yes, I can hear {phrase} in the audio."


def _no(phrase: str) -> str:
    return f"No, I cannot hear {phrase} in the audio."


def _times(n: int) -> str:
    return NUMBER_WORDS.get(n, f"{n} times")


def _pick(rng: np.random.Generator, items: Sequence):
    return items[int(rng.integers(len(items)))]


# (prompt, chosen, rejected, kind, rejected_audio): a pair before it is given its scene's audio, id and split
Draft = tuple[str, str, str, str, "str | None"]


def scene_pairs(
    onto: Ontology,
    timeline: Mapping,
    qa_rows: Sequence[QARow],
    audio: str,
    split: str,
    others: Sequence[tuple[str, str, frozenset[str]]],
    rng: np.random.Generator,
    writer: QuestionWriter | Callable[[str, str, np.random.Generator], str] = template_writer,
    timed: bool = True,
) -> list[Pair]:
    """All pairs one scene yields. ``others``: (scene_id, audio, labels present) of same-split scenes.

    The kinds are drawn in a fixed order (LISTEN, ACPO, AHA) from the one ``rng``, so a build is reproducible.
    ``timed=False``: a timeline of weak labels (a captioned clip's mentions, train/data/captions.py), whose spans are
    not the events': no AHA pairs, which are made of the events' order, counts and durations.
    """
    sid = timeline["scene_id"]
    gs = groups(timeline)
    bg = (timeline.get("background") or {}).get("label")
    drafts = [*_listen_drafts(qa_rows, rng, writer), *_acpo_drafts(onto, sid, qa_rows, gs, others, rng),
              *(_aha_drafts(onto, gs, bg, rng) if timed else [])]
    return [Pair(prompt, chosen, rejected, audio, rejected_audio, kind, sid, split)
            for prompt, chosen, rejected, kind, rejected_audio in drafts]


def _listen_drafts(qa_rows: Sequence[QARow], rng: np.random.Generator, writer) -> list[Draft]:
    """LISTEN: every absent-sound question of the scene becomes a "no" pair."""
    return [(writer(r.label, r.phrase, rng), _no(r.phrase), _yes(r.phrase), "listen_absent", None)
            for r in qa_rows if r.kind == "presence" and r.sampling != "positive"]


def _acpo_drafts(onto: Ontology, sid: str, qa_rows: Sequence[QARow], gs: Sequence,
                 others: Sequence[tuple[str, str, frozenset[str]]], rng: np.random.Generator) -> list[Draft]:
    """ACPO: output-contrastive (present sounds must not be denied, order must not be flipped) and one
    input-contrastive pair (same prompt and answer; the rejected audio is another scene that lacks the event)."""
    drafts: list[Draft] = []
    for r in qa_rows:
        if r.kind == "presence" and r.sampling == "positive":
            drafts.append((r.question, _yes(r.phrase), _no(r.phrase), "acpo_output_contrastive", None))
        elif r.kind == "order" and r.question.startswith("Does"):
            drafts.append((r.question, r.answer, "No" if r.answer == "Yes" else "Yes", "acpo_output_contrastive", None))
    if not gs:
        return drafts
    label = _pick(rng, [g.label for g in gs])
    lacking = [o for o in others if o[0] != sid and label not in o[2]]
    if lacking:
        other = _pick(rng, lacking)
        phrase = _pick(rng, onto[label].phrases[:GENERIC_PHRASES])
        q = PRESENCE_TEMPLATES[int(rng.integers(len(PRESENCE_TEMPLATES)))].format(x=phrase)
        drafts.append((q, _yes(phrase), _yes(phrase), "acpo_input_contrastive", other[1]))
    return drafts


def _aha_drafts(onto: Ontology, gs: Sequence, bg: str | None, rng: np.random.Generator) -> list[Draft]:
    """AHA counterfactuals of the strong timeline's caption: an event left out, an event misnamed, then
    :func:`_aha_temporal_drafts`."""
    drafts: list[Draft] = []
    present = {g.label for g in gs} | ({bg} if bg else set())
    truth = caption_from_groups(onto, gs, bg)
    if len(gs) >= 2:
        drop = int(rng.integers(len(gs)))
        kept = [g for i, g in enumerate(gs) if i != drop]
        drafts.append((ORDERED_CAPTION_PROMPT, truth, caption_from_groups(onto, kept, bg), "aha_event_omission", None))
    swap = int(rng.integers(len(gs)))
    decoys = [s for s in onto[gs[swap].label].siblings if s not in present] or sorted(set(onto.names) - present)
    labels = [g.label for g in gs]
    labels[swap] = _pick(rng, decoys)
    drafts.append((ORDERED_CAPTION_PROMPT, truth, caption_from_groups(onto, gs, bg, labels=labels), "aha_false_event_identity", None))
    return drafts + _aha_temporal_drafts(onto, gs, bg, truth, rng)


def _aha_temporal_drafts(onto: Ontology, gs: Sequence, bg: str | None, truth: str, rng: np.random.Generator) -> list[Draft]:
    """AHA's temporal counterfactuals: two sequential events told in swapped order, and a wrong count (of a
    repeated sound) or a wrong duration (of a single one)."""
    drafts: list[Draft] = []
    sequential = [i for i in range(len(gs) - 1) if gs[i].last_offset <= gs[i + 1].first_onset]
    if sequential:
        i = _pick(rng, sequential)
        a, b = gs[i], gs[i + 1]
        if rng.random() < 0.5:
            swapped = list(gs)
            swapped[i], swapped[i + 1] = b, a
            # the counterfactual narrates b before a (joined with "then", no overlap claimed)
            drafts.append((ORDERED_CAPTION_PROMPT, truth, _narrate_in_order(onto, swapped, bg), "aha_temporal_relation_error", None))
        else:
            pa, pb = onto[a.label].phrases[0], onto[b.label].phrases[0]
            drafts.append((ORDER_TEMPLATES[0].format(x=pb, y=pa), f"{pa[0].upper() + pa[1:]} comes first, then {pb}.",
                           f"{pb[0].upper() + pb[1:]} comes first, then {pa}.", "aha_temporal_relation_error", None))
    multi = [g for g in gs if len(g.spans) >= 2]
    if multi:
        g = _pick(rng, multi)
        n = len(g.spans)
        wrong = n + 1 if n == 2 or rng.random() < 0.5 else n - 1
        phrase = onto[g.label].phrases[0]
        drafts.append((COUNT_TEMPLATE.format(x=phrase), f"I hear {phrase} {_times(n)}.", f"I hear {phrase} {_times(wrong)}.",
                       "aha_quantitative_temporal_error", None))
    else:
        g = _pick(rng, gs)
        dur = g.spans[0][1] - g.spans[0][0]
        wrong = dur * float(rng.uniform(2.2, 3.5)) if dur < 2.5 or rng.random() < 0.5 else dur / float(rng.uniform(2.2, 3.5))
        phrase = onto[g.label].phrases[0]
        drafts.append((DURATION_TEMPLATE.format(x=phrase), f"About {dur:.1f} seconds.", f"About {wrong:.1f} seconds.",
                       "aha_quantitative_temporal_error", None))
    return drafts


def _narrate_in_order(onto: Ontology, gs: Sequence, background: str | None) -> str:
    """Caption that narrates the groups strictly in the given order (all joined with 'then')."""
    parts = []
    for i, g in enumerate(gs):
        clause = onto[g.label].caption
        n = len(g.spans)
        if n > 1:
            clause = f"{clause} {_times(n)}"
        parts.append(clause[0].upper() + clause[1:] if i == 0 else "then " + clause)
    text = ", ".join(parts)
    if background:
        text += f", with {onto[background].phrases[0]} in the background"
    return text + "."


def save_pairs(pairs: Sequence[Pair], out_dir: str | Path) -> None:
    """Save as a Hugging Face dataset (``save_to_disk``) with fixed string columns."""
    from datasets import Dataset, Features, Value

    features = Features({c: Value("string") for c in COLUMNS})
    data = {c: [getattr(p, c) for p in pairs] for c in COLUMNS}
    Dataset.from_dict(data, features=features).save_to_disk(str(out_dir))


def load_pairs(corpus_dir: str | Path, split: str, absolute_audio: bool = True):
    """Load ``DIR/prefs/<split>`` and (by default) resolve audio paths against DIR for training."""
    from datasets import load_from_disk

    base = Path(corpus_dir).resolve()
    ds = load_from_disk(str(base / "prefs" / split))
    if not absolute_audio:
        return ds

    def resolve(row: dict) -> dict:
        row["audio"] = str(base / row["audio"])
        if row["rejected_audio"]:
            row["rejected_audio"] = str(base / row["rejected_audio"])
        return row

    return ds.map(resolve)

