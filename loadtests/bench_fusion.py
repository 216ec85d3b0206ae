"""Late fusion of verifiers: every subset of the members, its weights chosen on validation, measured on test (unseen
recordings) and, with ``--lopo``, on packages it never heard.

    python -m loadtests.bench_fusion --corpus data/corpus \
        --members earwitness-verifier models/earwitness-verifier-yamnet models/earwitness-verifier-aisfx \
        [--lopo 5] [--report loadtests/results/verifier_fusion_subsets.md] [--out models/earwitness-verifier-fused]

Each member's calibrated logit of the asked-about class, per presence question, from its frozen encoder's feature
cache (``train.frozen_features.load_split``: the features the head was trained on, cached once per corpus); a subset is fused as
``sigmoid(Σ wᵢ·logit(pᵢ))`` with the weights from a grid on the simplex (steps of 0.1), chosen by validation ROC-AUC.
The table: each subset's validation ROC-AUC, test ROC-AUC over all negatives, per negative sampling, on events under
0.5 s, and (``--lopo N``) the mean over held-out packages, where each member's head is trained again without one
package at a time (N epochs, as the member's own leave-one-package-out) and the held-out scores fused question by
question with the subset's validation weights. ``--out`` writes the subset that is best on validation as a fused
verifier (``verifier.json`` naming its members, which must sit beside it): the fused logit Platt-calibrated and
thresholded on validation as ``train.verifier`` does for one head.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np

from loadtests.bench_guard import NEGATIVES, length_rows, presence_rows, table
from models.verifier.calibration import fuse_logits
from train.metrics import roc_auc
from train.verifier import ABSENT_PERCENTILE

SHORT = "events < 0.5 s"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", type=Path, default=Path("data/corpus"))
    ap.add_argument("--members", nargs="+", default=["earwitness-verifier", "models/earwitness-verifier-yamnet"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lopo", type=int, default=0, metavar="EPOCHS", help="also leave-one-package-out (heads of EPOCHS)")
    ap.add_argument("--lopo-cache", type=Path, default=None, help="keep each member's held-out scores here (a rerun reuses them)")
    ap.add_argument("--lopo-views", type=int, default=None, help="at most this many augmented views in the held-out heads' training")
    ap.add_argument("--report", type=Path, default=None, help="write the table here (markdown)")
    ap.add_argument("--out", type=Path, default=None, help="write the subset best on validation as a fused verifier here")
    ap.add_argument("--shipped", type=Path, default=Path("models/earwitness-verifier-fused"),
                    help="a fused verifier measured with its own weights too (the default it would replace)")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    rows = {split: presence_rows(args.corpus, 0, 0, split) for split in ("validation", "test")}
    y = {split: np.array([r["sampling"] == "positive" for r in rs]) for split, rs in rows.items()}
    names = [member_dir(m).name for m in args.members]
    logits = {name: {split: member_logits(member_dir(m), args.corpus, rows[split]) for split in rows} for name, m in zip(names, args.members)}
    held_out = lopo_logits(args.corpus, args.members, args.lopo, args.lopo_cache, args.lopo_views) if args.lopo else None
    results = [measure(subset, logits, y, rows["test"], args.corpus, held_out)
               for k in range(1, len(names) + 1) for subset in itertools.combinations(names, k)]
    shipped = json.loads((args.shipped / "verifier.json").read_text()) if (args.shipped / "verifier.json").exists() else None
    if shipped is not None and set(shipped["members"]) <= set(names):
        results.append({**measure(tuple(shipped["members"]), logits, y, rows["test"], args.corpus, held_out, shipped["weights"]),
                        "label": f"{args.shipped.name} as shipped"})
    text = subsets_table(results, len(rows["test"]))
    print(text)
    if args.report is not None:
        command = " ".join(["python -m loadtests.bench_fusion", *(argv if argv is not None else sys.argv[1:])])
        args.report.write_text(f"# Fusion of the verifier's members: every subset\n\n`{command}`\n\n{text}\n")
    if args.out is not None:
        best = max((r for r in results if "label" not in r), key=lambda r: r["validation"])
        fused = {split: fused_logit(best["members"], best["weights"], logits, split) for split in rows}
        print(f"\n{save_fused(args.out, [member_dir(m) for m, n in zip(args.members, names) if n in best['members']], best['weights'], fused, y, best)}")
    return 0


def fused_logit(members, weights, logits: dict, split: str) -> np.ndarray:
    """``Σ wᵢ·logit(pᵢ)`` of the members' calibrated probabilities on a split's questions (the served fusion)."""
    return fuse_logits(weights, [1 / (1 + np.exp(-logits[n][split])) for n in members])


def member_logits(directory: Path, corpus: Path, rows: list[dict]) -> np.ndarray:
    """A shipped member's calibrated logit of each row's asked-about class, from its encoder's cached features of the
    rows' split: the head, its class offsets (prior correction) and its Platt calibration, as it serves."""
    import torch

    from models.verifier.checkpoint import load_embedded
    from train.frozen_features import load_split
    from train.verifier import clip_logits

    verifier = load_embedded(directory)
    sc = verifier.scorer.cfg
    encoder = sc.kind if sc.kind in ("yamnet", "aisfx") else sc.encoder
    split = {r["split"] for r in rows}
    if len(split) != 1:
        raise ValueError(f"rows from several splits: {split}")
    data = load_split(corpus, split.pop(), encoder, verifier.index.classes, "both", (0,))
    raw = clip_logits(verifier.scorer, data.features, torch.from_numpy(verifier.class_texts()))
    if verifier.class_offsets is not None:
        raw = raw + verifier.class_offsets
    index = {c: i for i, c in enumerate(verifier.index.classes)}
    cal = verifier.calibration
    return np.array([cal.a * raw[data.rows[r["scene_id"]], index[r["label"]]] + cal.b for r in rows])


def question_key(r: dict) -> tuple:
    return r["scene_id"], r["label"], r["sampling"]


def best_weights(parts: list[np.ndarray], y: np.ndarray, step: float = 0.1) -> list[float]:
    """The weights on the simplex grid (``step``) with the highest ROC-AUC of the fused logit on ``y``."""
    n = len(parts)
    if n == 1:
        return [1.0]
    ticks = round(1 / step)
    grid = [[k / ticks for k in c] for c in itertools.product(range(ticks + 1), repeat=n - 1) if sum(c) <= ticks]
    grid = [[*w, 1 - sum(w)] for w in grid]
    return max(grid, key=lambda w: roc_auc(y, sum(wi * p for wi, p in zip(w, parts))))


def measure(subset: tuple[str, ...], logits: dict, y: dict, test_rows: list[dict], corpus: Path, held_out: dict | None,
            weights: list[float] | None = None) -> dict:
    """One subset: weights on validation (unless given), then its test ROC-AUC per negative sampling and length, and
    held-out packages."""
    weights = weights or best_weights([logits[n]["validation"] for n in subset], y["validation"])
    fused = {split: fused_logit(subset, weights, logits, split) for split in y}
    smp = np.array([r["sampling"] for r in test_rows])
    out = {"members": list(subset), "weights": [round(w, 4) for w in weights], "validation": roc_auc(y["validation"], fused["validation"]),
           "test": roc_auc(y["test"], fused["test"])}
    for kind in NEGATIVES:
        keep = (smp == "positive") | (smp == kind)
        out[kind] = roc_auc(y["test"][keep], fused["test"][keep])
    for name, _, auc in length_rows(corpus, test_rows, y["test"], fused["test"]):
        out[name] = auc
    # `correct` on a model that always says 'yes': a 'yes' is overridden below the served absent threshold (the
    # ABSENT_PERCENTILE of validation's present questions), which the calibration keeps in the same place
    for pct, tag in ((ABSENT_PERCENTILE, ""), (5.0, " at 5%")):
        below = np.percentile(fused["validation"][y["validation"]], pct)
        out["overridden" + tag] = float((fused["test"][y["test"]] < below).mean())
        out["adversarial false yes" + tag] = float((fused["test"][smp == "adversarial"] >= below).mean())
    if held_out is not None:
        out["lopo"] = fused_lopo([held_out[n] for n in subset], weights)
    return out


def subsets_table(results: list[dict], questions: int) -> str:
    cols = ["validation", "test", *NEGATIVES, SHORT] + (["lopo"] if "lopo" in results[0] else []) + \
        ["adversarial false yes", "overridden", "adversarial false yes at 5%", "overridden at 5%"]
    heads = ["members (weights chosen on validation)", "validation", "test (all negatives)", *NEGATIVES, SHORT] + \
            (["leave-one-package-out"] if "lopo" in results[0] else []) + \
            ["`correct`: adversarial false 'yes'", "true 'yes' overridden", "… threshold at validation's 5%: false 'yes'", "overridden"]
    body = [[" + ".join(f"{short(n)} {w:g}" for n, w in zip(r["members"], r["weights"]))
             + (f" ({r['label']})" if "label" in r else ""),
             *[r.get(c, float("nan")) for c in cols]] for r in results]
    return (f"{questions} test presence questions; ROC-AUC, then `correct` on a model that always says 'yes' at the "
            f"served absent threshold (the {ABSENT_PERCENTILE:g}nd percentile of validation's present questions' fused scores), "
            "and at the 5th percentile (the most a target allows to override).\n\n" + table(heads, body))


def short(name: str) -> str:
    """A member's name in the table: the shipped Whisper head is earwitness-verifier, the others say what they hear."""
    return "whisper" if name == "earwitness-verifier" else name.removeprefix("earwitness-verifier-")


def lopo_logits(corpus: Path, members: list[str], epochs: int, cache: Path | None = None,
                views: int | None = None) -> dict[str, dict[str, dict[tuple, tuple[bool, float]]]]:
    """Per member (by name), its leave-one-package-out held-out logits (:func:`held_out_logits`), kept in ``cache`` (one
    file per member checkpoint, corpus, epochs and views) when given; ``views`` caps the augmented views."""
    from train.verifier import TextSpace

    space = TextSpace.build(corpus)
    return {member_dir(m).name: cached_held_out(corpus, member_dir(m), space, epochs, cache, views) for m in members}


def member_corpus(directory: Path, corpus: Path) -> Path:
    """The corpus a member's heads are trained on: the one its card names (a member trained on teacher scenes names
    the corpus that holds them) when it holds ``corpus``'s test questions, else ``corpus``."""
    named = Path(json.loads((directory / "verifier.json").read_text())["training"].get("corpus") or corpus)
    same = (named / "qa" / "test.jsonl").exists() and (named / "qa" / "test.jsonl").read_bytes() == (corpus / "qa" / "test.jsonl").read_bytes()
    return named if same else corpus


def cached_held_out(corpus: Path, directory: Path, space, epochs: int, cache: Path | None,
                    views: int | None = None, compute=None) -> dict[str, dict[tuple, tuple[bool, float]]]:
    """:func:`held_out_logits` of a member (or ``compute()``), read from / written to ``cache`` (keyed by its
    checkpoint's card, the corpus its heads train on, ``epochs`` and ``views``)."""
    import hashlib

    train_on = member_corpus(directory, corpus)
    compute = compute or (lambda: held_out_logits(train_on, directory, space, epochs, views))
    if cache is None:
        return compute()
    key = hashlib.sha256((directory / "verifier.json").read_bytes() + f"{train_on.resolve()}:{epochs}:{views}".encode()).hexdigest()[:16]
    path = cache / f"{directory.name}-{key}.json"
    if path.exists():
        doc = json.loads(path.read_text())
        return {pkg: {tuple(k): (y, s) for k, y, s in rows} for pkg, rows in doc.items()}
    out = compute()
    cache.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({pkg: [[list(k), y, s] for k, (y, s) in rows.items()] for pkg, rows in out.items()}))
    return out


def held_out_logits(corpus: Path, directory: Path, space, epochs: int, views: int | None = None) -> dict[str, dict[tuple, tuple[bool, float]]]:
    """A member's leave-one-package-out, per package: question key → (present?, calibrated logit), each package's head
    trained as the member's own (its card's encoder, views (at most ``views``), batch, lr, seed, prior correction and
    calibration)."""
    from train.verifier import head_config, head_data, head_lopo

    doc = json.loads((directory / "verifier.json").read_text())
    sc, tr, cal = doc["scorer"], doc["training"], doc["calibration"]
    encoder = sc["kind"] if sc["kind"] in ("yamnet", "aisfx") else sc["encoder"]
    data = head_data(corpus, encoder, min(tr.get("views", 0), views if views is not None else 99), space.classes)
    cfg = head_config(encoder, int(data["train"].features.shape[-1]), sc.get("width", 0))
    lopo = head_lopo(corpus, data, space, cfg, epochs, doc["prior_correction"], keep_scores=True, batch=tr["batch"], lr=tr["lr"], seed=tr["seed"])
    out = {}
    for pkg, v in lopo.items():
        if len(set(v["keys"])) != len(v["keys"]):
            raise ValueError(f"{pkg}: a question key repeats; the fusion could not pair questions")
        out[pkg] = {k: (bool(y), cal["a"] * float(s) + cal["b"]) for k, y, s in zip(v["keys"], v["y"], v["scores"])}
        print(json.dumps({"member": directory.name, "package": pkg, "auc": round(v["auc"], 4), "questions": v["questions"]}), flush=True)
    return out


def fused_lopo(per_member: list[dict[str, dict[tuple, tuple[bool, float]]]], weights: list[float]) -> float:
    """Mean over held-out packages of the fused ROC-AUC on the questions every member scores."""
    aucs = []
    for pkg in per_member[0]:
        common = sorted(set.intersection(*[set(m[pkg]) for m in per_member]))
        y = np.array([per_member[0][pkg][k][0] for k in common])
        aucs.append(roc_auc(y, sum(w * np.array([m[pkg][k][1] for k in common]) for w, m in zip(weights, per_member))))
    return float(np.mean(aucs))


def member_dir(name: str) -> Path:
    from models.verifier.checkpoint import EMBEDDED_VERIFIER_DIR

    return EMBEDDED_VERIFIER_DIR if name in ("", "earwitness-verifier") else Path(name)


def save_fused(out: Path, dirs: list[Path], weights: list[float], fused: dict[str, np.ndarray], y: dict[str, np.ndarray], result: dict) -> Path:
    """The fused verifier: Platt calibration and thresholds of the fused logit on validation, the test table."""
    from train.verifier import calibrate

    a, b, absent_below, present_above = calibrate(fused["validation"], y["validation"])
    dirs = [d.resolve() for d in dirs]
    out.mkdir(parents=True, exist_ok=True)
    if any(d.parent != out.resolve().parent for d in dirs):
        raise ValueError(f"the members {dirs} must sit beside {out}")
    verdicts = ("overridden", "adversarial false yes", "overridden at 5%", "adversarial false yes at 5%")
    aucs = {("all negatives" if k == "test" else k): round(float(v), 4) for k, v in result.items()
            if k not in ("members", "weights", "validation", "label", *verdicts)}
    doc = {"kind": "earwitness-fused", "members": [d.name for d in dirs], "weights": [round(float(w), 4) for w in weights],
           "calibration": {"a": a, "b": b}, "thresholds": {"absent_below": absent_below, "present_above": present_above},
           "validation_roc_auc": round(float(result["validation"]), 4), "test_roc_auc": aucs,
           "correct_on_always_yes": {k: round(float(result[k]), 4) for k in verdicts}}
    (out / "verifier.json").write_text(json.dumps(doc, indent=1))
    return out / "verifier.json"


if __name__ == "__main__":
    sys.exit(main())
