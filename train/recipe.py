"""``earwitness train recipe``: the stage commands in order, each reading the previous stage's directory by name.

A recipe is a list of :class:`Step`: the command a user would type (``earwitness train base …``, ``train lookup``,
``train listen``, ``train dpo``, ``eval``, ``export``) and the directory it writes under the work directory. A step whose
directory already holds its ``stage.json`` is done and skipped, so a recipe stopped anywhere continues where it
stopped. Every stage records its config, its input's and the corpus's fingerprints, its metrics, the versions and its
wall time there (``train.stages.write_stage``); the recipe only gathers those records into ``results.json``,
``report.md`` and, with ``--ship``, the committed model and its card.

earwitness-tiny (the test-size model) and earwitness-small (the embedded default) differ in their base (from scratch;
from pretrained parts, then the lookup) and in what LISTEN trains (the projector; the tower's top layers, its norm and
the projector through the frozen lookup); DPO, the evaluations and the export are the same commands for both, and for the production
families.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from train import small_recipe, tiny_base
from train.audio_path import AudioPathFit
from train.lookup import HEARD_LOOKUP, LookupFit
from train.data.ontology import load_ontology
from train.data.report import markdown, plot_stages
from train.model_card import copy_reports, write_model_card
from train.stages import STAGE_FILE, ensure_corpus, point_adapter_at, resolve_input, stage_fingerprint, versions, write_stage
from train.tower import TowerDistillConfig, distil, export_whisper

# The evaluation sets: earwitness-small's card was measured on 150 presence questions per sampling, 60 per temporal
# kind and 40 captions of the test split, and the gates (oracle and served ROC-AUC) on 600 presence questions of
# validation and test; earwitness-tiny on the evaluation's defaults.
SMALL_EVAL = ("--presence-per-sampling", "150", "--per-temporal-kind", "60", "--captions", "40", "--gates", "600")
# The stages the card's rows name, by the directory of their evaluation.
ROWS = {"eval-base": "baseline (positive-only)", "eval-listen": "+ LISTEN", "eval-dpo": "+ DPO (shipped)"}


@dataclass(frozen=True)
class Step:
    """One stage: the command (as typed after ``earwitness``) and the directory under the work directory it writes."""

    out: str
    argv: tuple[str, ...]
    gated: bool = False  # a stage whose gate must pass before the next trains (earwitness-small's lookup and hear)


def steps(model: str, corpus: Path, work: Path, seed: int = 0, tower: Path | None = None,
          extra: dict[str, Sequence[str]] | None = None) -> list[Step]:
    """The recipe of ``model`` (``small`` | ``tiny``) as commands; ``extra``: more arguments for a step, by its
    directory (a smaller run, e.g. ``{"dpo": ["--max-steps", "2"]}``). ``tower`` (small): a distillation run or a
    checkpoint whose distilled tower layers the base starts from; without it the recipe distils one first."""
    extra = extra or {}

    def step(out: str, *argv: str, gated: bool = False) -> Step:
        reads = () if argv[0] == "export" else ("--corpus", str(corpus))  # export reads no data
        return Step(out, (*argv, *reads, "--out", str(work / out), *extra.get(out, ())), gated)

    def at(out: str) -> str:
        return str(work / out)

    s = str(seed)
    if model == "small":
        first = [] if tower else [step("tower", "train", "tower", "--tune-layers", "2", "--epochs", "3")]
        return [*first,
                step("base", "train", "base", "--model", "small", "--tower", str(tower or work / "tower"), "--seed", s),
                step("eval-base", "eval", "--model", at("base"), *SMALL_EVAL),
                step("lookup", "train", "lookup", "--from", at("base"), "--seed", s, gated=True),  # gate 1
                step("listen", "train", "listen", "--from", at("lookup"), "--projector", "lookup", "--seed", s),
                # the lookup learns the noise of the tokens LISTEN made (gate 2 is measured on what this stage leaves)
                step("hear", "train", "lookup", "--from", at("listen"), "--heard", "--seed", s, gated=True),
                step("eval-listen", "eval", "--model", at("hear"), *SMALL_EVAL),
                # DPO is ~60x the CPU of a supervised answer (two full sequences, policy and reference, the tower on both
                # sides): 40 pairs of each of the 7 kinds fit the budget. Weighting the pairs towards absent sounds (120
                # LISTEN, 60 + 60 ACPO, 20 per AHA kind) at lr 1e-3 collapsed to "No" to everything.
                step("dpo", "train", "dpo", "--from", at("hear"), "--pairs-per-kind", "40", "--learning-rate", "5e-4",
                     "--batch-size", "8", "--epochs", "1", "--seed", s),
                step("eval-dpo", "eval", "--model", at("dpo"), *SMALL_EVAL),
                step("export", "export", "--merge", "--model", at("dpo"))]
    return [step("base", "train", "base", "--model", "tiny", "--seed", s),
            step("eval-base", "eval", "--model", at("base")),
            step("listen", "train", "listen", "--from", at("base"), "--kinds", "presence", "--max-rows", "4000", "--learning-rate", "2e-3",
                 "--seed", s),
            step("eval-listen", "eval", "--model", at("listen")),
            step("dpo", "train", "dpo", "--from", at("listen"), "--pairs-per-kind", "220", "--learning-rate", "5e-4", "--batch-size", "8",
                 "--seed", s),
            step("eval-dpo", "eval", "--model", at("dpo")),
            step("export", "export", "--merge", "--model", at("dpo"))]


# ------------------------------------------------------------------------------------ the stages only some models have


def tower_stage(corpus: Path, out: Path, config: TowerDistillConfig) -> dict:
    """``train tower``: the AudioSet tagger's sound events distilled into the Whisper tower's top layers."""
    started = time.time()
    card = distil(corpus, out, config, load_ontology(corpus / "ontology.json").names)
    print(f"the distilled tower as a Whisper checkpoint: {export_whisper(out, config.encoder)}")
    write_stage(out, "tower", config, None, corpus, card["metrics"], time.time() - started, extra={"starts_from": config.encoder})
    return card["metrics"]


def base_stage(model: str, corpus: Path, out: Path, seed: int = 0, epochs: float | None = None, with_absent: bool = False,
               tower: Path | None = None) -> dict:
    """``train base``: earwitness-tiny from scratch, or earwitness-small from its pretrained parts (on ``tower``'s
    distilled layers: a distillation run or a checkpoint that commits them), as a checkpoint in ``out``."""
    started = time.time()
    defaults = small_recipe.BASE if model == "small" else tiny_base.BASE
    config = replace(defaults, seed=seed, **({"epochs": epochs} if epochs is not None else {}),
                     **({"samplings": ("positive", "random", "popular", "adversarial")} if with_absent else {}))
    if model == "small":
        history = small_recipe.train_base(corpus, out, config, tower)
    else:
        history = tiny_base.train_base(corpus, out, config=config)
    starts = {"from": str(tower) if tower else f"earwitness-{model} parts", "fingerprint": stage_fingerprint(tower) if tower else None}
    write_stage(out, "base", config, None, corpus, _last_losses(history), time.time() - started, extra={"model": model, "starts_from": starts})
    return _last_losses(history)


def lookup_stage(source: Path, corpus: Path, out: Path, seed: int = 0, steps: int | None = None, heard: bool = False) -> dict:
    """``train lookup`` (earwitness-small): the language model's layers learn to answer over the sounds' written names
    (``heard``: and over the model's own audio tokens, after LISTEN)."""
    started = time.time()
    config = replace(HEARD_LOOKUP if heard else LookupFit(), seed=seed, **({"steps": steps} if steps is not None else {}))
    history = small_recipe.lookup_stage(source, corpus, out, config)
    gate = json.loads((out / "lookup.json").read_text())["gate"]  # gate 1, as measured
    metrics = {"steps": history[-1]["step"], "validation_oracle_auc_curve": history[-1]["validation_auc"], "gate": gate}
    if heard:
        metrics["validation_served_auc_curve"] = history[-1]["validation_served_auc"]
    write_stage(out, "lookup", config, resolve_input(str(source)), corpus, metrics, time.time() - started)
    return metrics


def listen_names_stage(source: Path, corpus: Path, out: Path) -> dict:
    """``train listen --projector names`` (earwitness-small after ``train lookup``): the projector in closed form."""
    started, config = time.time(), small_recipe.NamesFit()
    metrics = small_recipe.listen_names_stage(source, corpus, out, config)
    write_stage(out, "listen", config, resolve_input(str(source)), corpus, metrics, time.time() - started, extra={"projector": "names"})
    return metrics


def listen_lookup_stage(source: Path, corpus: Path, out: Path, seed: int = 0, steps: int | None = None) -> dict:
    """``train listen --projector lookup`` (earwitness-small after ``train lookup``): the audio path learns the lookup's
    language, the language model frozen (gate 2)."""
    started = time.time()
    config = replace(AudioPathFit(), seed=seed, **({"steps": steps} if steps is not None else {}))
    metrics = small_recipe.listen_lookup_stage(source, corpus, out, config)
    write_stage(out, "listen", config, resolve_input(str(source)), corpus, metrics, time.time() - started, extra={"projector": "lookup"})
    return metrics


def _last_losses(history: list[dict]) -> dict:
    """A supervised stage's metrics: its steps, its last training loss and its last validation loss."""
    val = next((h["val_loss"] for h in reversed(history) if "val_loss" in h), None)
    return {"steps": len(history), "loss": history[-1]["loss"] if history else None, "val_loss": val}


# ------------------------------------------------------------------------------------ the loop


def command(argv: Sequence[str]) -> None:
    """Run one stage as its own process, ``python -m earwitness ARGV``: what a user types, with the memory of the
    previous stage given back."""
    subprocess.run([sys.executable, "-m", "earwitness", *argv], check=True)


def run_recipe(model: str, corpus: Path, work: Path, ship_dir: Path | None = None, seed: int = 0, tower: Path | None = None,
               extra: dict[str, Sequence[str]] | None = None, run: Callable[[Sequence[str]], None] = command) -> dict:
    """Every step not yet done, in order (``run``: how a command runs; in-process callers pass the CLI's ``main``),
    then the stages' records gathered in ``work/results.json``; returns that record."""
    ensure_corpus(corpus, seed)
    failed: str | None = None  # a stage whose gate is not passed: only its own evaluation runs after it
    for step in steps(model, corpus, work, seed, tower, extra):
        if failed is not None and not (step.argv[0] == "eval" and str(work / failed) in step.argv):
            break
        if (work / step.out / STAGE_FILE).exists():
            print(f"[recipe] {step.out}: done ({work / step.out / STAGE_FILE})", flush=True)
        else:
            print(f"[recipe] earwitness {shlex.join(step.argv)}", flush=True)
            run(step.argv)
        gate = (json.loads((work / step.out / STAGE_FILE).read_text()).get("metrics") or {}).get("gate")
        if step.gated and gate and not gate["passed"]:  # each gate passes before the next stage trains
            failed = step.out
            print(f"[recipe] {step.out}: its gate is not passed ({json.dumps(gate)}); the recipe stops after its evaluation. "
                  f"Train the stage on (`earwitness {shlex.join(step.argv)} --steps N` resumes from its checkpoint; LISTEN's: "
                  "--max-steps N), then run the recipe again.", flush=True)
    if failed is not None:
        ship_dir = None
    record = gather(work, seed)
    if ship_dir is not None:
        ship(model, work, record, ship_dir)
    return record


def gather(work: Path, seed: int) -> dict:
    """The stages' records as one: each evaluated stage's results (by the card's row names), each stage's wall time."""
    stages = {p.parent.name: json.loads(p.read_text()) for p in sorted(work.glob(f"*/{STAGE_FILE}"))}
    results = {row: json.loads((work / d / "results.json").read_text()).popitem()[1] for d, row in ROWS.items() if d in stages}
    record = {"results": results, "timings_s": {name.replace("-", " "): r["wall_s"] for name, r in stages.items()},
              "stages": {name: {"input": (r.get("input") or {}).get("fingerprint"), "metrics": r.get("metrics")} for name, r in stages.items()},
              "versions": versions(), "seed": seed}
    (work / "results.json").write_text(json.dumps(record, indent=2))
    if results:
        plot_stages(results, work / "stages.png")
        (work / "report.md").write_text(f"# {work.name}: evaluation\n\n" + markdown(results) + "\n")
    return record


def ship(model: str, work: Path, record: dict, ship_dir: Path) -> None:
    """The finished recipe as a committed model: the weights LISTEN left, DPO's adapter, the curves and the card."""
    reports = {"base_loss.png": work / "base" / "loss.png", "lookup_loss.png": work / "lookup" / "loss.png",
               "lookup.json": work / "lookup" / "lookup.json", "listen.json": work / "listen" / "listen.json", "hear.json": work / "hear" / "lookup.json",
               "dpo_curve.png": work / "dpo" / "dpo_curve.png", "stages.png": work / "stages.png"}
    if model == "small":
        small_recipe.ship(work / "hear", work / "dpo" / "adapter", reports, record, ship_dir)
    else:
        ship_tiny(work / "base", work / "dpo" / "adapter", reports, record, ship_dir)


SHIPPED_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "processor_config.json", "chat_template.jinja")


def ship_tiny(base_dir: Path, adapter_dir: Path, reports: dict[str, Path], record: dict, ship_dir: Path) -> None:
    """Base weights, processor, adapter, curves and evaluation into the committed model directory."""
    ship_dir.mkdir(parents=True, exist_ok=True)
    for name in SHIPPED_FILES:
        if (base_dir / name).exists():
            shutil.copy2(base_dir / name, ship_dir / name)
    shutil.rmtree(ship_dir / "adapter", ignore_errors=True)
    shutil.copytree(adapter_dir, ship_dir / "adapter", ignore=shutil.ignore_patterns("*.png", "*.jsonl", "checkpoint-*", "README.md"))
    point_adapter_at(ship_dir / "adapter", ship_dir.name)
    copy_reports(reports, record, ship_dir / "training")
    write_model_card(ship_dir, record)
