"""Late fusion of two verifiers: the weight chosen on validation, measured on test (unseen recordings).

    python -m loadtests.bench_fusion --corpus data/corpus --a earwitness-verifier --b models/earwitness-verifier-yamnet \
        [--out models/earwitness-verifier-fused]

Each verifier's calibrated probability of the asked-about class, per presence question; fused as
``sigmoid(w·logit(p_a) + (1 − w)·logit(p_b))`` with ``w`` from a grid, chosen by validation ROC-AUC. Prints test
ROC-AUC per negative sampling and per length of the asked-about sound, for each verifier alone and fused.
``--out`` writes the fused verifier (``verifier.json`` naming its members, which must sit beside it): the fused logit
Platt-calibrated and thresholded on validation as ``train.verifier`` does for one head.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import soundfile as sf

from loadtests.bench_guard import NEGATIVES, length_rows, table
from train.metrics import roc_auc


def question_rows(corpus: Path, split: str) -> list[dict]:
    import json

    rows = [json.loads(line) for line in (corpus / "qa" / f"{split}.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "presence"]


def probabilities(verifier_name: str, corpus: Path, rows: list[dict]) -> np.ndarray:
    """The verifier's probability of each row's asked-about class (its phrase matched as served)."""
    from serving.guard.verifier import load_verifier

    verifier = load_verifier(verifier_name)
    matched = {m.text: m.event for m in verifier.match(sorted({r["phrase"] for r in rows}))}
    cache: dict[str, dict[str, float]] = {}
    for r in rows:
        if r["scene_id"] not in cache:
            cache[r["scene_id"]] = verifier.class_probabilities(sf.read(corpus / r["audio"], dtype="float32")[0])
    return np.array([cache[r["scene_id"]].get(matched.get(r["phrase"]) or r["label"], 0.0) for r in rows])


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", type=Path, default=Path("data/corpus"))
    ap.add_argument("--a", default="earwitness-verifier")
    ap.add_argument("--b", default="models/earwitness-verifier-yamnet")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="write the fused verifier here (beside both members)")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    rows = {split: question_rows(args.corpus, split) for split in ("validation", "test")}
    y = {split: np.array([r["sampling"] == "positive" for r in rs]) for split, rs in rows.items()}
    scores = {name: {split: logit(probabilities(name, args.corpus, rows[split])) for split in rows} for name in (args.a, args.b)}
    grid = np.linspace(0, 1, 11)
    w = max(grid, key=lambda w: roc_auc(y["validation"], w * scores[args.a]["validation"] + (1 - w) * scores[args.b]["validation"]))
    fused = {split: w * scores[args.a][split] + (1 - w) * scores[args.b][split] for split in rows}
    smp = np.array([r["sampling"] for r in rows["test"]])
    cols = {args.a: scores[args.a]["test"], args.b: scores[args.b]["test"], f"fused (w={w:.1f} on {args.a})": fused["test"]}
    out = []
    for kind, keep in [("all negatives", np.ones(len(smp), bool)), *[(k, (smp == "positive") | (smp == k)) for k in NEGATIVES]]:
        out.append([kind, *[roc_auc(y["test"][keep], s[keep]) for s in cols.values()]])
    for i, (name, *_) in enumerate(length_rows(args.corpus, rows["test"], y["test"], cols[args.a])):
        out.append([name, *[length_rows(args.corpus, rows["test"], y["test"], s)[i][2] for s in cols.values()]])
    val = [roc_auc(y["validation"], s) for s in (scores[args.a]["validation"], scores[args.b]["validation"], fused["validation"])]
    print(f"validation ROC-AUC: {val[0]:.4f} / {val[1]:.4f} / fused {val[2]:.4f}; test: {len(rows['test'])} presence questions\n")
    print(table(["test ROC-AUC", *cols], out))
    if args.out is not None:
        print(f"\n{save_fused(args.out, [args.a, args.b], [w, 1 - w], fused, y, out)}")
    return 0


def member_dir(name: str) -> Path:
    from serving.guard.verifier import EMBEDDED_VERIFIER_DIR

    return EMBEDDED_VERIFIER_DIR if name in ("", "earwitness-verifier") else Path(name)


def save_fused(out: Path, members: list[str], weights: list[float], fused: dict[str, np.ndarray], y: dict[str, np.ndarray],
               table_rows: list[list]) -> Path:
    """The fused verifier: Platt calibration and thresholds of the fused logit on validation, the test table."""
    import json

    from train.metrics import fit_platt
    from train.verifier import ABSENT_PERCENTILE, PRESENT_PERCENTILE

    a, b = fit_platt(fused["validation"], y["validation"].astype(np.float32))
    p_val = 1 / (1 + np.exp(-(a * fused["validation"] + b)))
    absent_below = float(np.percentile(p_val[y["validation"]], ABSENT_PERCENTILE))
    present_above = float(max(absent_below, np.percentile(p_val[~y["validation"]], PRESENT_PERCENTILE)))
    dirs = [member_dir(m).resolve() for m in members]
    out.mkdir(parents=True, exist_ok=True)
    if any(d.parent != out.resolve().parent for d in dirs):
        raise ValueError(f"the members {dirs} must sit beside {out}")
    doc = {"kind": "earwitness-fused", "members": [d.name for d in dirs], "weights": [round(float(w), 4) for w in weights],
           "calibration": {"a": a, "b": b}, "thresholds": {"absent_below": absent_below, "present_above": present_above},
           "test_roc_auc": {row[0]: round(float(row[-1]), 4) for row in table_rows}}
    (out / "verifier.json").write_text(json.dumps(doc, indent=1))
    return out / "verifier.json"


if __name__ == "__main__":
    sys.exit(main())
