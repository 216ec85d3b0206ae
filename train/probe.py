"""How much an audio encoder knows about recordings it never heard: sound-event probes on frozen features.

A language model can only answer "is there X?" as well as its audio tokens separate present from
absent X. A probe fits a small sound-event head on a frozen encoder's outputs over the train split,
then scores every presence question by the head's clip-level logit for the asked-about class and
reports ROC-AUC per negative sampling. Three heads, from least to most use of the strong labels:

- ``meanmax``: one logistic regression per class on the clip's mean and max over time;
- ``attention``: per class, an attention over time of per-frame logits (multiple-instance pooling);
- ``frame``: per-frame logits trained on the strong labels' activity, the clip's score their maximum.

Train against test shows how far the audio side generalises to unseen recordings; the
leave-one-package-out evaluation (train without a package's recordings, test on them) is the
honest figure for recordings from elsewhere. ``earwitness train probe`` prints the table. A report: it reads
from the shared modules (``train.frozen_features``, ``train.tower_probe``, ``train.package_holdout``,
``train.metrics``) and nothing imports it but the command that runs it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from train.data.ontology import load_ontology
from train.data.qa import NEGATIVE_SAMPLINGS as SAMPLINGS, read_qa_rows
from train.frozen_features import ProbeData, held_out_packages, load_split
from train.metrics import choose_prior_correction, class_prior_logits, per_class_auc, presence_auc
from train.package_holdout import leave_one_package_out
from train.tower_probe import POOLINGS, clip_logits, fit_probe


def run_probe(corpus_dir: str | Path, encoders: tuple[str, ...] = ("whisper-tiny.en",), poolings: tuple[str, ...] = POOLINGS,
              views: tuple[int, ...] = (0,), layers: str = "both", lopo: bool = True, lopo_count: int = 6,
              window_s: int = 10, train_packages: tuple[str, ...] | None = None, train_scenes: int | None = None,
              prior_correction: bool = True, progress: bool = True, **fit) -> list[dict]:
    """Every encoder × pooling on one corpus: presence ROC-AUC per split and sampling, and leave-one-package-out.

    ``train_packages`` fits only on train scenes made entirely of those packages' recordings (the
    core packages: the corpus as it was, scored on the same test split); ``train_scenes`` keeps that
    many of them (drawn with seed 0), so that breadth and count can be told apart. ``prior_correction``
    takes the share of each class's training prior that validation says helps out of its scores
    (``train.verifier.choose_prior_correction``), as the verifier does.
    """

    corpus_dir = Path(corpus_dir)
    classes = load_ontology(corpus_dir / "ontology.json").names
    qa = {s: read_qa_rows(corpus_dir, s) for s in ("train", "validation", "test")}
    results = []
    for encoder in encoders:
        data = {"train": load_split(corpus_dir, "train", encoder, classes, layers, views, window_s, progress)}
        for split in ("validation", "test"):
            data[split] = load_split(corpus_dir, split, encoder, classes, layers, (0,), window_s, progress)
        packages = held_out_packages(corpus_dir, lopo_count) if lopo else []
        keep = train_subset(data["train"], train_packages, train_scenes)
        for pooling in poolings:
            head = fit_probe(data["train"], pooling, keep=keep, **fit)
            row = {"corpus": corpus_dir.name, "encoder": encoder, "pooling": pooling, "views": len(views), "layers": layers,
                   "window_s": window_s, "train_packages": "core" if train_packages else "all",
                   "train_rows": int(len(data["train"].features) if keep is None else keep.sum())}
            logits = {split: clip_logits(head, d.features[: len(d.rows)]) for split, d in data.items()}
            prior_logit = class_prior_logits(data["train"].targets.max(1) if keep is None else data["train"].targets[keep].max(1))
            beta = choose_prior_correction(
                lambda offsets: presence_auc(logits["validation"] + offsets, data["validation"].rows, classes, qa["validation"])["all"], prior_logit,
            ) if prior_correction else 0.0
            logits = {split: v - beta * prior_logit for split, v in logits.items()}
            row["prior_beta"] = beta
            for split, d in data.items():
                row[split] = presence_auc(logits[split], d.rows, classes, qa[split])
            row["per_class_test"] = per_class_auc(logits["test"], data["test"].rows, classes, qa["test"])
            if packages and keep is None:
                def fit_head(keep_rows, pooling=pooling):
                    head = fit_probe(data["train"], pooling, keep=keep_rows, **fit)
                    return lambda features: clip_logits(head, features)

                row["lopo"] = leave_one_package_out(data, qa, classes, packages, fit_head, prior_beta=beta)
                aucs = [v["auc"] for v in row["lopo"].values() if not math.isnan(v["auc"])]
                row["lopo_mean"] = float(np.mean(aucs)) if aucs else float("nan")
            results.append(row)
            if progress:
                print(probe_table([row]), flush=True)
    return results


def probe_report(results: list[dict], out: Path | None = None) -> str:
    """The table as markdown; with ``out``, also probe.json, probe.md and a bar plot (probe.png)."""
    text = probe_table(results)
    if out is None:
        return text
    out.mkdir(parents=True, exist_ok=True)
    (out / "probe.json").write_text(json.dumps(results, indent=1))
    (out / "probe.md").write_text(text + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r.get('train_packages', 'all')} data\n{r['encoder']}\n{r['pooling']}" + (f" +{r['views'] - 1}aug" if r["views"] > 1 else "")
              + ("\n−prior" if r.get("prior_beta") else "") for r in results]
    series = {"test (all negatives)": [r["test"].get("all", np.nan) for r in results],
              "test vs adversarial": [r["test"].get("adversarial", np.nan) for r in results],
              "leave-one-package-out": [r.get("lopo_mean", np.nan) for r in results]}
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(results)), 4))
    width = 0.8 / len(series)
    for k, (name, values) in enumerate(series.items()):
        ax.bar(np.arange(len(results)) + (k - 1) * width, values, width, label=name)
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set_xticks(np.arange(len(results)), labels, fontsize=7)
    ax.set_ylim(0.4, 1.0)
    ax.set_ylabel("presence ROC-AUC")
    ax.set_title("frozen encoder probes on unseen recordings")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "probe.png", dpi=120)
    plt.close(fig)
    return text


def train_subset(train: ProbeData, packages: tuple[str, ...] | None, scenes: int | None) -> np.ndarray | None:
    """Mask of the train rows to fit on (None: all of them)."""
    if packages is None and scenes is None:
        return None
    keep = np.array([p <= set(packages) | {"synthetic"} for p in train.packages]) if packages else np.ones(len(train.packages), bool)
    if scenes is not None and keep.sum() > scenes:
        chosen = np.random.default_rng(0).choice(np.flatnonzero(keep), size=scenes, replace=False)
        keep = np.zeros_like(keep)
        keep[chosen] = True
    return keep


def probe_table(results: list[dict]) -> str:
    """Markdown: one row per corpus × encoder × pooling × augmented views."""
    head = ("| corpus | train data (rows) | encoder | window | pooling | aug views | train | test | test vs random | vs popular | vs adversarial "
            "| leave-one-package-out | prior β |")
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for r in results:
        lopo = f"{r['lopo_mean']:.3f}" if "lopo_mean" in r else "–"
        beta = f"{r['prior_beta']:g}" if "prior_beta" in r else "–"
        t = r["test"]
        data = f"{r.get('train_packages', 'all')} ({r.get('train_rows', '?')})"
        lines.append(f"| {r['corpus']} | {data} | {r['encoder']} | {r.get('window_s', 10)} s | {r['pooling']} | {r['views'] - 1} | {r['train'].get('all', float('nan')):.3f} "
                     f"| {t.get('all', float('nan')):.3f} | " + " | ".join(f"{t[s]:.3f}" if s in t else "–" for s in SAMPLINGS)
                     + f" | {lopo} | {beta} |")
    return "\n".join(lines)


