"""Late fusion of two verifiers: the weight chosen on validation, measured on test (unseen recordings).

    python -m loadtests.bench_fusion --corpus data/corpus --a earwitness-verifier --b models/earwitness-verifier-yamnet \
        [--out models/earwitness-verifier-fused]

Each verifier's calibrated probability of the asked-about class, per presence question; fused as
``sigmoid(w·logit(p_a) + (1 − w)·logit(p_b))`` with ``w`` from a grid, chosen by validation ROC-AUC. Prints test
ROC-AUC per negative sampling and per length of the asked-about sound, for each verifier alone and fused.
``--out`` writes the fused verifier (``verifier.json`` naming its members, which must sit beside it): the fused logit
Platt-calibrated and thresholded on validation as ``train.verifier`` does for one head.

``--lopo N`` measures the fusion on packages it never heard instead: each member's head is trained again without
one package at a time (N epochs, as the member's own leave-one-package-out), and the two held-out scores are fused
question by question, on the questions both members score (``--report`` writes the table).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from loadtests.bench_guard import NEGATIVES, length_rows, presence_rows, table, verifier_scores
from models.verifier.calibration import fuse_logits, logit
from models.verifier.checkpoint import load_verifier
from train.metrics import roc_auc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", type=Path, default=Path("data/corpus"))
    ap.add_argument("--a", default="earwitness-verifier")
    ap.add_argument("--b", default="models/earwitness-verifier-yamnet")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="write the fused verifier here (beside both members)")
    ap.add_argument("--lopo", type=int, default=0, metavar="EPOCHS", help="leave-one-package-out of the fusion (heads of EPOCHS)")
    ap.add_argument("--weights", type=float, nargs=2, default=None, help="--lopo: the members' weights (default: the fused verifier's)")
    ap.add_argument("--report", type=Path, default=None, help="--lopo: write the table here (markdown)")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    if args.lopo:
        weights = args.weights or json.loads((member_dir("earwitness-verifier").parent / "earwitness-verifier-fused" / "verifier.json").read_text())["weights"]
        rows = fused_lopo(args.corpus, [args.a, args.b], weights, args.lopo)
        text = table(["held-out package", "questions", args.a, args.b, f"fused ({weights[0]:g} / {weights[1]:g})"], rows)
        print(text)
        if args.report is not None:
            args.report.write_text(f"# Leave-one-package-out of the fused verifier\n\n`python -m loadtests.bench_fusion --lopo {args.lopo} "
                                   f"--a {args.a} --b {args.b} --report {args.report}`\n\n{text}\n")
        return 0
    rows = {split: presence_rows(args.corpus, 0, 0, split) for split in ("validation", "test")}
    y = {split: np.array([r["sampling"] == "positive" for r in rs]) for split, rs in rows.items()}
    verifiers = {name: load_verifier(name) for name in (args.a, args.b)}
    probs = {name: {split: verifier_scores(v, args.corpus, rows[split])[0] for split in rows} for name, v in verifiers.items()}
    scores = {name: {split: logit(p) for split, p in by_split.items()} for name, by_split in probs.items()}

    def fused_on(split: str, w: float) -> np.ndarray:
        return fuse_logits([w, 1 - w], [probs[args.a][split], probs[args.b][split]])

    w = max(np.linspace(0, 1, 11), key=lambda w: roc_auc(y["validation"], fused_on("validation", w)))
    fused = {split: fused_on(split, w) for split in rows}
    smp = np.array([r["sampling"] for r in rows["test"]])
    cols = {args.a: scores[args.a]["test"], args.b: scores[args.b]["test"], f"fused (w={w:.1f} on {args.a})": fused["test"]}
    out = []
    for kind, keep in [("all negatives", np.ones(len(smp), bool)), *[(k, (smp == "positive") | (smp == k)) for k in NEGATIVES]]:
        out.append([kind, *[roc_auc(y["test"][keep], s[keep]) for s in cols.values()]])
    by_length = [length_rows(args.corpus, rows["test"], y["test"], s) for s in cols.values()]
    for per_col in zip(*by_length):
        out.append([per_col[0][0], *[row[2] for row in per_col]])
    val = [roc_auc(y["validation"], s) for s in (scores[args.a]["validation"], scores[args.b]["validation"], fused["validation"])]
    print(f"validation ROC-AUC: {val[0]:.4f} / {val[1]:.4f} / fused {val[2]:.4f}; test: {len(rows['test'])} presence questions\n")
    print(table(["test ROC-AUC", *cols], out))
    if args.out is not None:
        print(f"\n{save_fused(args.out, [args.a, args.b], [w, 1 - w], fused, y, out)}")
    return 0


def held_out_logits(corpus: Path, directory: Path, space, epochs: int) -> dict[str, dict[tuple, tuple[bool, float]]]:
    """A member's leave-one-package-out, per package: question key → (present?, calibrated logit), each package's head
    trained as the member's own (its card's encoder, views, batch, lr, seed, prior correction and calibration)."""
    from train.verifier import head_config, head_data, head_lopo

    doc = json.loads((directory / "verifier.json").read_text())
    sc, tr, cal = doc["scorer"], doc["training"], doc["calibration"]
    encoder = "yamnet" if sc["kind"] == "yamnet" else sc["encoder"]
    data = head_data(corpus, encoder, tr.get("views", 0), space.classes)
    cfg = head_config(encoder, int(data["train"].features.shape[-1]), sc.get("width", 0))
    lopo = head_lopo(corpus, data, space, cfg, epochs, doc["prior_correction"], keep_scores=True, batch=tr["batch"], lr=tr["lr"], seed=tr["seed"])
    out = {}
    for pkg, v in lopo.items():
        if len(set(v["keys"])) != len(v["keys"]):
            raise ValueError(f"{pkg}: a question key repeats; the fusion could not pair questions")
        out[pkg] = {k: (bool(y), cal["a"] * float(s) + cal["b"]) for k, y, s in zip(v["keys"], v["y"], v["scores"])}
        print(json.dumps({"member": directory.name, "package": pkg, "auc": round(v["auc"], 4), "questions": v["questions"]}), flush=True)
    return out


def fused_lopo(corpus: Path, members: list[str], weights: list[float], epochs: int) -> list[list]:
    """Per held-out package: ROC-AUC of each member and of their fusion on the questions both score, then the mean."""
    from train.verifier import TextSpace

    space = TextSpace.build(corpus)
    per_member = [held_out_logits(corpus, member_dir(m), space, epochs) for m in members]
    rows = []
    for pkg in per_member[0]:
        common = sorted(set.intersection(*[set(m[pkg]) for m in per_member]))
        y = np.array([per_member[0][pkg][k][0] for k in common])
        logits = [np.array([m[pkg][k][1] for k in common]) for m in per_member]
        rows.append([pkg, len(common), *[roc_auc(y, x) for x in logits], roc_auc(y, sum(w * x for w, x in zip(weights, logits)))])
    rows.append(["mean", sum(r[1] for r in rows), *[float(np.mean([r[i] for r in rows])) for i in range(2, len(rows[0]))]])
    return rows


def member_dir(name: str) -> Path:
    from models.verifier.checkpoint import EMBEDDED_VERIFIER_DIR

    return EMBEDDED_VERIFIER_DIR if name in ("", "earwitness-verifier") else Path(name)


def save_fused(out: Path, members: list[str], weights: list[float], fused: dict[str, np.ndarray], y: dict[str, np.ndarray],
               table_rows: list[list]) -> Path:
    """The fused verifier: Platt calibration and thresholds of the fused logit on validation, the test table."""
    import json

    from train.verifier import calibrate

    a, b, absent_below, present_above = calibrate(fused["validation"], y["validation"])
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
