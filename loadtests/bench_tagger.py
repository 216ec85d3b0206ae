"""Frozen vs fine-tuned AudioSet tagger, with and without distillation: the verifier's table and plot.

    python -m loadtests.bench_tagger --corpus data/corpus --epochs 6 --out loadtests/results

Trains each configuration (``earwitness train verifier --audio yamnet --tune ... --distill ... [--steps]``) into
``runs/tagger/<name>`` unless it is already there (so the sweep resumes), then scores every one on the
same test questions as ``bench_guard`` (all of them, through the served verifier's own audio path): ROC-AUC
overall, adversarial, on events shorter than 0.5 s, plus what each kept of the 521 AudioSet outputs and
how its AudioSet vocabulary ranks the ontology's presence questions.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from loadtests.bench_guard import length_rows, presence_rows, table, verifier_scores

SWEEP = (("top", 1.0, False), ("top", 0.0, False), ("upper", 1.0, False), ("upper", 0.0, False), ("top", 1.0, True))
PEERS = {"frozen YAMNet + head": "models/earwitness-verifier-yamnet", "frozen Whisper tiny.en + head": "models/earwitness-verifier",
         "fused: Whisper head + frozen YAMNet head (the default)": "models/earwitness-verifier-fused"}


def run_name(tune: str, distill: float, steps: bool = False) -> str:
    return f"{tune}-distill{distill:g}" + ("-steps" if steps else "")


def train_sweep(corpus: Path, runs: Path, epochs: int, sweep=SWEEP) -> dict[str, Path]:
    from train.tagger import TuneConfig, train_tuned_verifier

    out = {}
    for tune, distill, steps in sweep:
        name = run_name(tune, distill, steps)
        out[name] = runs / name
        if (out[name] / "verifier.json").exists():
            print(f"{name}: trained already ({out[name]})", flush=True)
            continue
        card = train_tuned_verifier(corpus, out[name], TuneConfig(tune=tune, distill=distill, epochs=epochs, steps=steps))
        print(json.dumps({"run": name, **{k: v for k, v in card["metrics"].items() if "roc_auc" in k}}), flush=True)
    return out


def measure(corpus: Path, directories: dict[str, Path], kept: Path) -> list[dict]:
    """Every verifier on all of the test split's presence questions (kept in ``kept`` per verifier file, so a resumed
    sweep scores only what is new)."""
    from models.verifier.checkpoint import load_verifier
    from train.metrics import roc_auc

    rows = presence_rows(corpus, 0, 0)
    y = np.array([r["sampling"] == "positive" for r in rows])
    smp = np.array([r["sampling"] for r in rows])
    done = json.loads(kept.read_text()) if kept.exists() else {}
    out = []
    for name, directory in directories.items():
        key = f"{Path(directory).resolve()}@{(Path(directory) / 'verifier.json').stat().st_mtime_ns}"
        if key in done:
            out.append({**done[key], "verifier": name})
            continue
        t0 = time.time()
        verifier = load_verifier(str(directory))
        s, _ = verifier_scores(verifier, corpus, rows)
        adv = (smp == "positive") | (smp == "adversarial")
        short = {r[0]: r[2] for r in length_rows(corpus, rows, y, s)}["events < 0.5 s"]
        doc = json.loads((Path(directory) / "verifier.json").read_text())
        metrics, tr = doc.get("metrics", {}), doc.get("training", {})
        out.append({"verifier": name, "test": roc_auc(y, s), "adversarial": roc_auc(y[adv], s[adv]), "short": short,
                    "validation": metrics.get("validation_roc_auc"), "lopo": metrics.get("lopo_mean"),
                    "retained": (metrics.get("audioset_retained") or {}).get("teacher_top1_in_top5"),
                    "audioset_auc": (doc.get("audioset") or {}).get("test_roc_auc"),
                    "best_epoch": next((h["best_epoch"] for h in tr.get("history", []) if "best_epoch" in h), None),
                    "train_s": tr.get("seconds"), "score_s": round(time.time() - t0, 1)})
        print(json.dumps(out[-1]), flush=True)
        done[key] = out[-1]
        kept.parent.mkdir(parents=True, exist_ok=True)
        kept.write_text(json.dumps(done, indent=1))
    return out


KEY = """Tuned runs (`earwitness train verifier --audio yamnet --tune <top|upper> --distill <w> [--steps]`): `top` trains the
tagger's last two blocks (2.1 M parameters), `upper` every block from its 512-channel 6 × 4 maps on (3.5 M), each with
the head, the frozen trunk cached; `distill1` keeps the 521 AudioSet outputs near the frozen tagger's (BCE to its
probabilities, weight 1), `distill0` does not; `steps` scores each 0.32 s step of a patch instead of the patch. Tagger
learning rate 1e-4, head 2e-3, one-cycle, the best validation epoch kept (top: 6 epochs; upper: 4). "AudioSet top-1
kept in top 5": on test patches, the share whose frozen tagger's top class is among the tuned one's top 5. "AudioSet
vocabulary AUC": the ontology's presence questions scored by the AudioSet output of the class's name (the
open-vocabulary path). Training seconds on this 2-core CPU, often beside other jobs. LOPO was measured for the frozen
heads only (a tuned LOPO is one fine-tune per held-out package).
"""


def report(results: list[dict], out: Path, questions: int) -> str:
    headers = ["verifier", "test ROC-AUC", "adversarial", "events < 0.5 s", "validation", "LOPO mean", "AudioSet top-1 kept in top 5",
               "AudioSet vocabulary AUC", "best epoch", "training s"]
    body = [[r["verifier"], r["test"], r["adversarial"], r["short"], r["validation"] or "", r["lopo"] or "", r["retained"] or "",
             r["audioset_auc"] or "", r["best_epoch"] or "", int(r["train_s"]) if r["train_s"] else ""] for r in results]
    text = (f"# The verifier's audio side: frozen vs fine-tuned AudioSet tagger\n\nCorpus test split, all {questions} presence "
            "questions, scored through each verifier's served audio path. `python -m loadtests.bench_tagger`.\n\n"
            + table(headers, body) + "\n\n" + KEY)
    out.mkdir(parents=True, exist_ok=True)
    (out / "verifier_tagger.md").write_text(text)
    _plot(results, out / "verifier_tagger.png")
    return text


def _plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("test", "all negatives"), ("adversarial", "adversarial"), ("short", "events < 0.5 s")]
    fig, ax = plt.subplots(figsize=(12, 4.5))
    width = 0.8 / len(results)
    for i, r in enumerate(results):
        ax.bar(np.arange(len(keys)) + i * width, [r[k] for k, _ in keys], width, label=r["verifier"])
    ax.set_xticks(np.arange(len(keys)) + width * (len(results) - 1) / 2, [label for _, label in keys])
    ax.set_ylim(0.6, 1.0)
    ax.set_ylabel("ROC-AUC, corpus test split")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title("Verifier audio side: frozen vs fine-tuned tagger (± distillation)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtests.bench_tagger")
    ap.add_argument("--corpus", type=Path, default=Path("data/corpus"))
    ap.add_argument("--runs", type=Path, default=Path("runs/tagger"))
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--only", nargs="*", default=None, help="train only these runs (e.g. top-distill1); measure all that exist")
    ap.add_argument("--out", type=Path, default=Path("loadtests/results"))
    args = ap.parse_args(argv)
    sweep = [s for s in SWEEP if args.only is None or run_name(*s) in args.only]
    trained = train_sweep(args.corpus, args.runs, args.epochs, sweep)
    existing = {run_name(*s): args.runs / run_name(*s) for s in SWEEP if (args.runs / run_name(*s) / "verifier.json").exists()}
    directories = {**PEERS, **{f"tuned {k}": v for k, v in {**existing, **trained}.items()}}
    results = measure(args.corpus, {k: Path(v) for k, v in directories.items()}, args.runs / "measured.json")
    print(report(results, args.out, len(presence_rows(args.corpus, 0, 0))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
