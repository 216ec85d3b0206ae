"""Hallucination evaluation on unseen recordings (the corpus' test split), through the serving backend.

Presence follows the audio hallucination benchmarks: a balanced set per negative sampling
(random / popular / adversarial absent sounds against the same present ones), with accuracy,
precision, recall and F1 reported twice — 'no' as the positive class (the benchmark convention,
it rewards catching absent sounds) and 'yes' as the positive class — plus yes-rate and the share
of answers that are neither. Order, count and duration questions get error rates against chance;
captions get the share of the events they mention that are not in the audio.
"""

from __future__ import annotations

import random
import re
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import soundfile as sf
from tqdm import tqdm

from models.answers import classify
from serving.backends import AudioPrompt
from train.data.ontology import Ontology
from train.data.qa import NEGATIVE_SAMPLINGS, PRESENCE_FAMILIES, QARow, presence_question, read_qa_rows
from train.data.formats import read_timelines

MAX_TOKENS = {"presence": 4, "order": 16, "count": 6, "duration": 8, "caption": 64}


@dataclass(frozen=True)
class EvalPlan:
    presence_per_sampling: int = 300
    per_temporal_kind: int = 200
    captions: int = 150
    seed: int = 0


def sample_rows(rows: list[QARow], plan: EvalPlan) -> list[QARow]:
    """A fixed, seeded subset: equal positives and negatives per sampling, and some of each other kind."""
    rng = random.Random(plan.seed)
    by: dict[tuple[str, str], list[QARow]] = defaultdict(list)
    for r in rows:
        by[(r.kind, r.sampling if r.kind == "presence" else "")].append(r)
    chosen: list[QARow] = []
    n = plan.presence_per_sampling
    chosen += rng.sample(by[("presence", "positive")], min(n, len(by[("presence", "positive")])))
    for s in NEGATIVE_SAMPLINGS:
        chosen += rng.sample(by[("presence", s)], min(n, len(by[("presence", s)])))
    for kind in ("order", "count", "duration"):
        chosen += rng.sample(by[(kind, "")], min(plan.per_temporal_kind, len(by[(kind, "")])))
    chosen += rng.sample(by[("caption", "")], min(plan.captions, len(by[("caption", "")])))
    return chosen


def answer_rows(backend, rows: list[QARow], corpus_dir: Path, batch_size: int = 16, progress: bool = True) -> list[str]:
    """Greedy answers, batched by kind so short answers aren't held up by captions."""
    cache: dict[str, np.ndarray] = {}

    def audio(path: str) -> np.ndarray:
        if path not in cache:
            cache[path] = sf.read(corpus_dir / path, dtype="float32")[0]
        return cache[path]

    answers: list[str] = [""] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: (rows[i].kind, rows[i].audio))
    bar = tqdm(total=len(rows), desc="eval", disable=not progress, unit="q")
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        prompts = [AudioPrompt(audio(rows[i].audio), rows[i].question, MAX_TOKENS[rows[i].kind]) for i in idx]
        for i, gen in zip(idx, backend.generate(prompts)):
            answers[i] = gen.text
        bar.update(len(idx))
    bar.close()
    return answers


def _prf(tp: int, fp: int, fn: int) -> dict:
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def presence_metrics(rows: list[QARow], answers: list[str]) -> dict:
    positives = [(r, a) for r, a in zip(rows, answers) if r.kind == "presence" and r.sampling == "positive"]
    out = {}
    for sampling in NEGATIVE_SAMPLINGS:
        negatives = [(r, a) for r, a in zip(rows, answers) if r.kind == "presence" and r.sampling == sampling]
        items = [(True, classify(a)) for _, a in positives] + [(False, classify(a)) for _, a in negatives]
        if not negatives:
            continue
        said_yes = [k == "yes" for _, k in items]
        said_no = [k == "no" for _, k in items]
        truth = [t for t, _ in items]
        out[sampling] = {
            "n": len(items),
            "accuracy": float(np.mean([(k == "yes") == t and k != "other" for t, k in items])),
            "no_positive": _prf(
                sum(n and not t for n, t in zip(said_no, truth)),
                sum(n and t for n, t in zip(said_no, truth)),
                sum(not n and not t for n, t in zip(said_no, truth)),
            ),
            "yes_positive": _prf(
                sum(y and t for y, t in zip(said_yes, truth)),
                sum(y and not t for y, t in zip(said_yes, truth)),
                sum(not y and t for y, t in zip(said_yes, truth)),
            ),
            "yes_rate": float(np.mean(said_yes)),
            "unparseable_rate": float(np.mean([k == "other" for _, k in items])),
            "false_yes_rate": float(np.mean([classify(a) == "yes" for _, a in negatives])),
            "true_yes_rate": float(np.mean([classify(a) == "yes" for _, a in positives])),
        }
    return out


def _norm(text: str) -> str:
    return re.sub(r"[^a-z0-9. ]+", "", text.lower()).strip(" .")


def _number(text: str) -> float | None:
    m = re.search(r"\d+(?:\.\d+)?", text)
    return float(m.group()) if m else None


def temporal_metrics(rows: list[QARow], answers: list[str]) -> dict:
    """Error rate per kind; durations count as right within 0.5 s or 25%."""
    out: dict[str, dict] = {}
    for kind in ("order", "count", "duration"):
        pairs = [(r, a) for r, a in zip(rows, answers) if r.kind == kind]
        if not pairs:
            continue
        right = []
        for r, a in pairs:
            if kind == "duration":
                got, want = _number(a), float(r.answer)
                right.append(got is not None and abs(got - want) <= max(0.5, 0.25 * want))
            elif kind == "order" and r.answer in ("Yes", "No"):
                right.append(classify(a) == r.answer.lower())
            else:
                right.append(_norm(a) == _norm(r.answer))
        out[kind] = {"n": len(pairs), "error_rate": 1 - float(np.mean(right)), "chance_error_rate": _chance(kind, pairs)}
    return out


def _chance(kind: str, pairs) -> float:
    """Error of the best answer that ignores the audio (the majority answer), the bar to clear."""
    if kind == "duration":
        return float("nan")
    counts: dict[str, int] = defaultdict(int)
    for r, _ in pairs:
        counts[_norm(r.answer) if r.answer not in ("Yes", "No") else r.answer] += 1
    if kind == "order":
        # which-first questions name one of two events: a coin flip; yes/no ones: the majority answer
        which = [r for r, _ in pairs if r.answer not in ("Yes", "No")]
        yn = [r for r, _ in pairs if r.answer in ("Yes", "No")]
        yes = sum(r.answer == "Yes" for r in yn)
        right = 0.5 * len(which) + max(yes, len(yn) - yes)
        return 1 - right / len(pairs)
    return 1 - max(counts.values()) / len(pairs)


def mentioned_classes(text: str, ontology: Ontology) -> set[str]:
    """Classes a caption names, by their phrases (longest match first, so 'dog barking' beats 'dog')."""
    low = f" {text.lower()} "
    found = set()
    for c in ontology:
        for phrase in (c.caption, *c.phrases):
            core = re.sub(r"^(a|an|the|some|someone) ", "", phrase.lower()).strip()
            if core and f" {core}" in low:
                found.add(c.name)
                break
    return found


def caption_metrics(rows: list[QARow], answers: list[str], ontology: Ontology, timelines: dict) -> dict:
    mentioned = absent = missed = present_total = 0
    for r, a in zip(rows, answers):
        if r.kind != "caption":
            continue
        t = timelines[r.scene_id]
        present = {e["label"] for e in t["events"]} | ({(t.get("background") or {}).get("label")} - {None})
        said = mentioned_classes(a, ontology)
        mentioned += len(said)
        absent += len(said - present)
        present_total += len(present)
        missed += len(present - said)
    return {
        "mentioned_events": mentioned,
        "hallucinated_share": absent / mentioned if mentioned else 0.0,
        "missed_share": missed / present_total if present_total else 0.0,
    }


def phrasing_metrics(backend, corpus_dir: str | Path, split: str = "test", per_answer: int = 40, seed: int = 0,
                     progress: bool = True) -> dict[str, dict[str, dict]]:
    """Presence accuracy per phrasing family, on its training templates and on its held-out paraphrases.

    The same balanced questions (``per_answer`` present and ``per_answer`` absent sounds, the absent ones drawn
    across the three negative samplings) are asked in every template, so families differ by wording alone.
    Returns ``{family: {"train" | "held_out": {n, accuracy, yes_rate, unparseable_rate}}}``.
    """
    corpus_dir = Path(corpus_dir)
    rng = random.Random(seed)
    presence = [r for r in read_qa_rows(corpus_dir, split) if r.kind == "presence" and r.phrase]
    base = rng.sample([r for r in presence if r.answer == "Yes"], per_answer) + rng.sample([r for r in presence if r.answer == "No"], per_answer)
    asked = [(family, part, replace(r, question=presence_question(t, r.phrase)))
             for family, parts in PRESENCE_FAMILIES.items() for part, templates in parts.items() for t in templates for r in base]
    answers = answer_rows(backend, [row for _, _, row in asked], corpus_dir, progress=progress)
    out: dict[str, dict[str, dict]] = defaultdict(dict)
    for family, part in dict.fromkeys((f, p) for f, p, _ in asked):
        kinds = [(row.answer == "Yes", classify(a)) for (f, p, row), a in zip(asked, answers) if (f, p) == (family, part)]
        out[family][part] = {"n": len(kinds), "accuracy": float(np.mean([(k == "yes") == t and k != "other" for t, k in kinds])),
                             "yes_rate": float(np.mean([k == "yes" for _, k in kinds])),
                             "unparseable_rate": float(np.mean([k == "other" for _, k in kinds]))}
    return dict(out)


def phrasing_table(metrics: dict[str, dict[str, dict]]) -> str:
    """Markdown: one row per family, training templates beside held-out paraphrases."""
    lines = ["| phrasing family | accuracy, trained templates | accuracy, held-out paraphrases | yes-rate (held out) | unparsed (held out) |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for family, parts in metrics.items():
        t, h = parts["train"], parts["held_out"]
        lines.append(f"| {family} | {100 * t['accuracy']:.1f} | {100 * h['accuracy']:.1f} | {100 * h['yes_rate']:.1f} | {100 * h['unparseable_rate']:.1f} |")
    every = [p["accuracy"] for parts in metrics.values() for p in parts.values()]
    lines.append(f"\nSpread across families and templates: {100 * (max(every) - min(every)):.1f} points.")
    return "\n".join(lines)


def evaluate(backend, corpus_dir: str | Path, split: str = "test", plan: EvalPlan = EvalPlan(), progress: bool = True) -> dict:
    from train.data.ontology import load_ontology

    corpus_dir = Path(corpus_dir)
    rows = sample_rows(read_qa_rows(corpus_dir, split), plan)
    answers = answer_rows(backend, rows, corpus_dir, progress=progress)
    timelines = read_timelines(corpus_dir, split)
    ontology = load_ontology(corpus_dir / "ontology.json")
    return {
        "presence": presence_metrics(rows, answers),
        "temporal": temporal_metrics(rows, answers),
        "caption": caption_metrics(rows, answers, ontology, timelines),
        "examples": [{"question": r.question, "expected": r.answer, "answer": a} for r, a in list(zip(rows, answers))[:: max(1, len(rows) // 12)]],
    }
