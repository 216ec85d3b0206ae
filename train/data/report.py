"""Evaluation results as a Markdown table and a side-by-side PNG of the stages."""

from __future__ import annotations

from pathlib import Path

from train.data.qa import NEGATIVE_SAMPLINGS as SAMPLINGS


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def presence_table(results: dict[str, dict]) -> str:
    """One row per stage × negative sampling; 'no'-positive is the benchmark convention."""
    lines = [
        "| stage | negatives | accuracy | F1 (no = positive) | P / R (no) | F1 (yes = positive) | P / R (yes) | yes-rate | false 'yes' on absent | unparseable |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for stage, res in results.items():
        for s in SAMPLINGS:
            m = res["presence"].get(s)
            if not m:
                continue
            no, yes = m["no_positive"], m["yes_positive"]
            lines.append(
                f"| {stage} | {s} | {_pct(m['accuracy'])} | {_pct(no['f1'])} | {_pct(no['precision'])} / {_pct(no['recall'])} | "
                f"{_pct(yes['f1'])} | {_pct(yes['precision'])} / {_pct(yes['recall'])} | {_pct(m['yes_rate'])} | "
                f"{_pct(m['false_yes_rate'])} | {_pct(m['unparseable_rate'])} |"
            )
    return "\n".join(lines)


def temporal_table(results: dict[str, dict]) -> str:
    kinds = ("order", "count", "duration")
    head = "| stage | " + " | ".join(f"{k} error (chance)" for k in kinds) + " | caption: mentioned events absent | caption: present events missed |"
    lines = [head, "|" + " --- |" * (len(kinds) + 3)]
    for stage, res in results.items():
        cells = []
        for k in kinds:
            m = res["temporal"].get(k)
            if not m:
                cells.append("–")
                continue
            chance = m["chance_error_rate"]
            cells.append(f"{_pct(m['error_rate'])} ({'–' if chance != chance else _pct(chance)})")
        cap = res["caption"]
        lines.append(f"| {stage} | " + " | ".join(cells) + f" | {_pct(cap['hallucinated_share'])} | {_pct(cap['missed_share'])} |")
    return "\n".join(lines)


def headline(results: dict[str, dict]) -> dict[str, dict]:
    """The numbers the targets are stated in: balanced presence accuracy and yes-rate over all samplings."""
    out = {}
    for stage, res in results.items():
        p = res["presence"]
        out[stage] = {
            "presence_accuracy": sum(p[s]["accuracy"] for s in p) / len(p),
            "yes_rate": sum(p[s]["yes_rate"] for s in p) / len(p),
            "adversarial_false_yes": p.get("adversarial", {}).get("false_yes_rate", float("nan")),
            "order_error": res["temporal"].get("order", {}).get("error_rate", float("nan")),
            "count_error": res["temporal"].get("count", {}).get("error_rate", float("nan")),
        }
    return out


def headline_table(results: dict[str, dict]) -> str:
    lines = ["| stage | presence accuracy | yes-rate | adversarial false 'yes' | order error | count error |", "| --- | --- | --- | --- | --- | --- |"]
    for stage, h in headline(results).items():
        lines.append(
            f"| {stage} | {_pct(h['presence_accuracy'])} | {_pct(h['yes_rate'])} | {_pct(h['adversarial_false_yes'])} | "
            f"{_pct(h['order_error'])} | {_pct(h['count_error'])} |"
        )
    return "\n".join(lines)


def plot_stages(results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    stages = list(results)
    metrics = [
        ("accuracy (random)", lambda r: r["presence"]["random"]["accuracy"]),
        ("accuracy (popular)", lambda r: r["presence"]["popular"]["accuracy"]),
        ("accuracy (adversarial)", lambda r: r["presence"]["adversarial"]["accuracy"]),
        ("yes-rate (adversarial)", lambda r: r["presence"]["adversarial"]["yes_rate"]),
        ("false 'yes' (adversarial)", lambda r: r["presence"]["adversarial"]["false_yes_rate"]),
        ("order error", lambda r: r["temporal"].get("order", {}).get("error_rate", 0.0)),
        ("count error", lambda r: r["temporal"].get("count", {}).get("error_rate", 0.0)),
    ]
    x = np.arange(len(metrics))
    width = 0.8 / max(1, len(stages))
    fig, ax = plt.subplots(figsize=(10, 4))
    for i, stage in enumerate(stages):
        ax.bar(x + i * width, [100 * f(results[stage]) for _, f in metrics], width, label=stage)
    ax.set_xticks(x + width * (len(stages) - 1) / 2, [name for name, _ in metrics], rotation=20, ha="right")
    ax.set_ylabel("%")
    ax.set_ylim(0, 100)
    ax.axhline(50, color="grey", lw=0.5, ls="--")
    ax.set_title("Earwitness-tiny on the test split (unseen recordings)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(results: dict[str, dict]) -> str:
    return "\n\n".join(
        [
            "### Headline (balanced presence sets, mean over random / popular / adversarial negatives)",
            headline_table(results),
            "### Presence, per negative sampling",
            "Positive class stated per column: 'no' = positive follows the audio hallucination benchmark "
            "(it scores catching absent sounds); 'yes' = positive scores hearing present ones.",
            presence_table(results),
            "### Order, count, duration and captions (error rates; chance = best audio-blind answer)",
            temporal_table(results),
            *(["### Hearing and answering, side by side (`train.gates`)",
               "Presence ROC-AUC of logit(Yes) − logit(No) over the true sound names at the served audio positions "
               "(oracle: can the language model answer from perfect hearing?) and over the model's own audio tokens "
               "(served: does the audio path speak its language?), beside the generated answers above (test split).",
               gates_table(results)] if any("gates" in r for r in results.values()) else []),
        ]
    )


def gates_table(results: dict[str, dict]) -> str:
    """Per stage: oracle and served ROC-AUC (validation / test) and the generated headline, so a gap shows."""
    lines = ["| stage | oracle ROC-AUC val / test | served ROC-AUC val / test | generated presence accuracy | yes-rate | adversarial false 'yes' |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, h in headline(results).items():
        g = results[name].get("gates")
        if g:
            oracle, served = (" / ".join(f"{g[s][key]:.3f}" for s in ("validation", "test")) for key in ("oracle_auc", "served_auc"))
            lines.append(f"| {name} | {oracle} | {served} | {_pct(h['presence_accuracy'])} | {_pct(h['yes_rate'])} | "
                         f"{_pct(h['adversarial_false_yes'])} |")
    return "\n".join(lines)
