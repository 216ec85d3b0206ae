"""Event-level F1 of ``/v1/audio/events``' detections against the corpus's strong labels, per ontology group.

    python -m loadtests.event_f1 --corpus data/corpus --split test [--tune-on validation] [--check-with PYTHON]

The verifier's timelines (``Verifier.timelines``: the same code the endpoint runs) are computed once per scene and
kept under ``runs/event_f1/`` (rerunning reuses them); detections are :func:`models.verifier.events.detect` with the
served settings. Matching is the DCASE event-based convention: an estimated event matches a reference event of the
same class when the onsets are within ``--collar`` (0.5 s) and the offsets within max(collar, 0.2 · the reference's
length); one-to-one, the largest matching (as ``sed_eval``'s optimal matching). F1 per class, micro over a group's
classes; background beds (labelled over the whole scene) count as events. ``--check-with`` runs ``sed_eval`` (in a
Python that has it, e.g. a separate venv) on the same lists and prints its overall F1 beside ours.
``--tune-on validation`` also sweeps the ontology threshold and the min gap on that split (micro F1; chosen there, never on
test: ``events_threshold`` 0.8, ``events_min_gap_s`` 1.0).
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

Event = tuple[float, float]  # onset, offset (s)
GAPS = (0.3, 1.0, 2.5)  # min-gap fills swept with the threshold (--tune-on)


def matches(ref: list[Event], est: list[Event], collar: float = 0.5, length_share: float = 0.2) -> int:
    """The largest one-to-one matching of estimated to reference events of one class in one file."""
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import maximum_bipartite_matching

    if not ref or not est:
        return 0
    ok = np.array([[abs(r[0] - e[0]) <= collar and abs(r[1] - e[1]) <= max(collar, length_share * (r[1] - r[0])) for e in est] for r in ref])
    if not ok.any():
        return 0
    return int((maximum_bipartite_matching(csr_matrix(ok.astype(np.int8)), perm_type="column") >= 0).sum())


def counts(reference: dict[str, dict[str, list[Event]]], estimated: dict[str, dict[str, list[Event]]], collar: float = 0.5) -> dict[str, list[int]]:
    """Per class ``[tp, fp, fn]`` over files; ``reference``/``estimated``: file → class → events."""
    out: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    for f in set(reference) | set(estimated):
        ref, est = reference.get(f, {}), estimated.get(f, {})
        for c in set(ref) | set(est):
            tp = matches(ref.get(c, []), est.get(c, []), collar)
            row = out[c]
            row[0] += tp
            row[1] += len(est.get(c, [])) - tp
            row[2] += len(ref.get(c, [])) - tp
    return dict(out)


def f1(tp: int, fp: int, fn: int) -> float:
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else float("nan")


def read_reference(path: Path, scenes: set[str] | None = None) -> dict[str, dict[str, list[Event]]]:
    ref: dict[str, dict[str, list[Event]]] = defaultdict(lambda: defaultdict(list))
    with path.open() as fh:
        for row in csv.DictReader(fh, delimiter="\t"):
            if scenes is not None and row["segment_id"] not in scenes:
                continue
            ref[row["segment_id"]][row["label"]].append((float(row["start_time_seconds"]), float(row["end_time_seconds"])))
    return ref


def timelines(corpus: Path, split: str, verifier_name: str | None, out: Path, limit: int | None = None) -> dict[str, dict]:
    """Scene → its ontology timeline (probs, starts, ends, clip probs, duration), computed once and kept in ``out``;
    ``limit``: the split's first scenes only (sorted by id; a scene's mix is random, so they are a random sample)."""
    from models.verifier.checkpoint import load_verifier
    from models.audio import decode

    out.mkdir(parents=True, exist_ok=True)
    verifier, kept = None, {}
    files = sorted((corpus / "scenes" / split).glob("*.flac"))[:limit]
    for i, path in enumerate(files):
        cache = out / f"{path.stem}.npz"
        if not cache.exists():
            verifier = verifier or load_verifier(verifier_name)
            clip = decode(path.read_bytes(), 16_000)
            t = verifier.timelines(clip.samples)[0]
            np.savez(cache, probs=t.probs.astype(np.float32), starts=t.starts, ends=t.ends, clip=t.clip, duration=len(clip.samples) / 16_000,
                     threshold=t.threshold, names=np.array(t.names))
            if i % 25 == 0:
                print(f"{split}: {i + 1}/{len(files)}", file=sys.stderr, flush=True)
        z = np.load(cache)
        kept[path.stem] = {k: z[k] for k in z.files}
    return kept


def estimate(tls: dict[str, dict], threshold: float | None, min_gap_s: float) -> dict[str, dict[str, list[Event]]]:
    from models.verifier.events import Timeline, detect

    est = {}
    for scene, z in tls.items():
        t = Timeline("ontology", [str(n) for n in z["names"]], z["starts"], z["ends"], z["probs"], z["clip"], float(z["threshold"]))
        est[scene] = {d.event: list(d.spans) for d in detect(t, min_gap_s, float(z["duration"]), threshold)}
    return est


def group_table(per_class: dict[str, list[int]], group_of: dict[str, str]) -> list[tuple[str, int, float, float, float]]:
    """Rows (group, reference events, precision, recall, F1), micro over each group's classes, then all."""
    groups: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    for c, (tp, fp, fn) in per_class.items():
        for g in (group_of.get(c, "other"), "all"):
            groups[g] = [a + b for a, b in zip(groups[g], (tp, fp, fn))]
    rows = []
    for g, (tp, fp, fn) in sorted(groups.items(), key=lambda kv: (kv[0] == "all", kv[0])):
        rows.append((g, tp + fn, tp / (tp + fp) if tp + fp else float("nan"), tp / (tp + fn) if tp + fn else float("nan"), f1(tp, fp, fn)))
    return rows


def sed_eval_f1(python: str, reference: dict, estimated: dict, collar: float) -> float:
    """Overall (micro) event-based F1 by ``sed_eval`` in another interpreter, on the same event lists."""
    script = f"""
import json, sys, sed_eval, dcase_util
ref, est = json.load(open(sys.argv[1])), json.load(open(sys.argv[2]))
labels = sorted({{c for f in ref.values() for c in f}} | {{c for f in est.values() for c in f}})
m = sed_eval.sound_event.EventBasedMetrics(event_label_list=labels, t_collar={collar}, percentage_of_length=0.2, evaluate_onset=True, evaluate_offset=True)
def lst(d, f):
    return dcase_util.containers.MetaDataContainer([{{"filename": f, "event_label": c, "onset": a, "offset": b}} for c, evs in d.get(f, {{}}).items() for a, b in evs])
for f in sorted(set(ref) | set(est)):
    m.evaluate(reference_event_list=lst(ref, f), estimated_event_list=lst(est, f))
print(m.results_overall_metrics()["f_measure"]["f_measure"])
"""
    with tempfile.TemporaryDirectory() as tmp:
        paths = [Path(tmp) / "ref.json", Path(tmp) / "est.json"]
        for p, d in zip(paths, (reference, estimated)):
            p.write_text(json.dumps({f: {c: list(map(list, evs)) for c, evs in v.items()} for f, v in d.items()}))
        done = subprocess.run([python, "-c", script, *map(str, paths)], capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    from serving.config import Settings
    from train.data.ontology import load_ontology

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", type=Path, default=Path("data/corpus"))
    ap.add_argument("--split", default="test")
    ap.add_argument("--tune-on", default=None, help="also sweep the ontology threshold on this split (validation)")
    ap.add_argument("--collar", type=float, default=0.5)
    ap.add_argument("--verifier", default=None, help="default: the served default (Settings.verifier)")
    ap.add_argument("--cache", type=Path, default=Path("runs/event_f1"))
    ap.add_argument("--limit", type=int, default=None, help="the first N scenes of the split (default: all)")
    ap.add_argument("--tune-limit", type=int, default=60, help="the first N scenes of the tuning split")
    ap.add_argument("--check-with", default=None, help="a Python with sed_eval installed, to cross-check the overall F1")
    args = ap.parse_args(argv)
    settings = Settings(_env_file=None)
    name = args.verifier or settings.verifier
    group_of = {c.name: c.group for c in load_ontology(args.corpus / "ontology.json" if (args.corpus / "ontology.json").exists() else None)}

    if args.tune_on:
        tls = timelines(args.corpus, args.tune_on, name, args.cache / Path(name).name / args.tune_on, args.tune_limit)
        ref = read_reference(args.corpus / "scenes" / args.tune_on / "strong.tsv", set(tls))
        print(f"| threshold ({args.tune_on}, {len(tls)} scenes) | " + " | ".join(f"min gap {g:g} s" for g in GAPS) + " |")
        print("| --- " * (len(GAPS) + 1) + "|")
        for th in (0.56, 0.7, 0.8, 0.85, 0.9):
            row = [np.sum(list(counts(ref, estimate(tls, th, gap), args.collar).values()), axis=0) for gap in GAPS]
            print(f"| {th:.2f} | " + " | ".join(f"{f1(*c):.3f} ({c[1]} false)" for c in row) + " |")

    tls = timelines(args.corpus, args.split, name, args.cache / Path(name).name / args.split, args.limit)
    ref = read_reference(args.corpus / "scenes" / args.split / "strong.tsv", set(tls))
    est = estimate(tls, settings.events_threshold, settings.events_min_gap_s)
    per_class = counts(ref, est, args.collar)
    threshold = settings.events_threshold or float(next(iter(tls.values()))["threshold"])
    print(f"\nEvent-based F1, {name} on the corpus {args.split} split ({len(tls)} scenes), threshold {threshold:.3f}, "
          f"collar {args.collar:g} s (offset: max(collar, 0.2 x length)), min gap {settings.events_min_gap_s:g} s\n")
    print("| group | reference events | precision | recall | F1 |\n| --- | --- | --- | --- | --- |")
    for g, n, p, r, f in group_table(per_class, group_of):
        print(f"| {'**all (micro)**' if g == 'all' else g} | {n} | {p:.3f} | {r:.3f} | {f:.3f} |")
    macro = np.nanmean([f1(*v) for c, v in per_class.items() if v[0] + v[2] > 0])
    print(f"\nclass-wise macro F1 (classes with reference events): {macro:.3f}")
    if args.check_with:
        print(f"sed_eval overall F1 on the same lists: {sed_eval_f1(args.check_with, ref, est, args.collar):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
