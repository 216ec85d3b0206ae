"""The whole recipe: corpus → tokenizer → base (from scratch) → LISTEN → DPO → evaluation → shipped model.

``earwitness train recipe --corpus DIR --out DIR`` runs it; each stage can also run alone.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from models.loading import load
from models.registry import resolve
from models.tiny import TinySize, build_untrained
from train.data.formats import read_timelines
from train.data.ontology import load_ontology
from train.data.qa import read_qa_rows
from train.data.report import markdown, plot_stages
from train.data.targets import frame_targets
from train.detection_pretrain import pretrain_encoder
from train.evaluate import EvalPlan
from train.features import feature_tag, scene_features
from train.model_card import write_model_card
from train.tower_probe import probe
from train.sft import StageConfig, select_rows, train_stage
from train.stages import Laps, align_dpo, ensure_corpus, evaluate_stage, point_adapter_at, versions

# Sized by measurement to fit the whole recipe in well under 90 minutes on 2 CPU cores.
# The base keeps the stage-0 encoder frozen: joint training from a random language model wipes
# out its sound-event knowledge and the model falls back to answer priors.
BASE = StageConfig(name="base", trainable="all_but_audio_encoder", samplings=("positive",), epochs=2.0, batch_size=16, learning_rate=1.5e-3, warmup_steps=60, turns_per_chat=4)
LISTEN = StageConfig(name="listen", trainable="audio_adapter", epochs=0.3, batch_size=16, learning_rate=2e-3, warmup_steps=10, caption_share=0.1, turns_per_chat=4)


def corpus_texts(corpus_dir: Path) -> list[str]:
    """Every question, answer and caption the model will read or write: the tokenizer's training text."""
    return [text for row in read_qa_rows(corpus_dir, "train") for text in (row.question, row.answer)]


def stage_data(corpus_dir: Path, split: str, processor, config: StageConfig, tag: str) -> tuple:
    feats, rows_of, frames = scene_features(corpus_dir, split, processor.feature_extractor, tag)
    return feats, rows_of, frames, select_rows(read_qa_rows(corpus_dir, split), config)


def train_base(corpus_dir: Path, out_dir: Path, size: TinySize = TinySize(), config: StageConfig = BASE, vocab_size: int = 2000, progress: bool = True):
    """Stage 1: a tokenizer and a model from scratch; with ``config.samplings=('positive',)`` the hallucinating baseline."""
    processor, model = build_untrained(corpus_texts(corpus_dir), size, vocab_size=vocab_size, seed=config.seed)
    tag = feature_tag(size)
    train = stage_data(corpus_dir, "train", processor, config, tag)
    val = stage_data(corpus_dir, "validation", processor, config, tag)
    pretrain_audio_encoder(model, corpus_dir, train, val, size, out_dir / "encoder", config.seed, progress)
    train_stage(model, processor.tokenizer, train, val, config, out_dir, progress=progress)
    processor.save_pretrained(out_dir)
    model.save_pretrained(out_dir)
    return processor, model


def pretrain_audio_encoder(model, corpus_dir: Path, train: tuple, val: tuple, size: TinySize, out_dir: Path, seed: int, progress: bool) -> None:
    """Stage 0: frame-level sound-event detection on the strong labels (see train.detection_pretrain)."""

    classes = load_ontology(corpus_dir / "ontology.json").names
    positions = size.max_source_positions // 2

    def targets(split: str, data: tuple):
        timelines = read_timelines(corpus_dir, split)
        return frame_targets(timelines, data[1], classes, positions, float(size.chunk_s))

    pretrain_encoder(model, train[0], targets("train", train), out_dir, val=(val[0], targets("validation", val)), seed=seed, progress=progress)


def train_listen(base_dir: Path, corpus_dir: Path, out_dir: Path, config: StageConfig = LISTEN, progress: bool = True):
    """Stage 2 (LISTEN): the base plus absent-sound questions answered 'no'; only the audio adapter learns."""

    processor, model = load(resolve(str(base_dir)), device="cpu")
    size = TinySize(**model.config.earwitness_tiny_size)
    tag = feature_tag(size)
    train = stage_data(corpus_dir, "train", processor, config, tag)
    val = stage_data(corpus_dir, "validation", processor, config, tag)
    train_stage(model, processor.tokenizer, train, val, config, out_dir, progress=progress)
    return processor, model


def run_recipe(corpus_dir: Path, work_dir: Path, ship_dir: Path | None = None, seed: int = 0, progress: bool = True, eval_plan=None, base_from: Path | None = None) -> dict:
    """Corpus to shipped adapter, with every stage's evaluation; returns the results by stage.

    ``base_from`` reuses a trained base (stages 0–1) and runs only the alignment.
    """
    from peft import PeftModel

    plan = eval_plan or EvalPlan(seed=seed)
    work_dir.mkdir(parents=True, exist_ok=True)
    lap = Laps()
    timings = lap.timings
    results: dict[str, dict] = {}

    if ensure_corpus(corpus_dir, seed, progress):
        lap("corpus")
    base_dir = work_dir / "base"
    if base_from is not None:
        shutil.copytree(base_from, base_dir, dirs_exist_ok=True)
        processor, base = load(resolve(str(base_dir)), device="cpu")
    else:
        processor, base = train_base(corpus_dir, base_dir, config=_seeded(BASE, seed), progress=progress)
    lap("base")
    results["baseline (positive-only)"] = evaluate_stage("base", processor, base, corpus_dir, plan, progress)
    lap("eval base")
    probed = probe(base_dir, corpus_dir)
    lap("probe")
    _, listened = train_listen(base_dir, corpus_dir, work_dir / "listen", config=_seeded(LISTEN, seed), progress=progress)
    lap("listen")
    results["+ LISTEN"] = evaluate_stage("listen", processor, listened, corpus_dir, plan, progress)
    lap("eval listen")
    adapter_dir = align_dpo(listened, processor, corpus_dir, work_dir / "dpo", seed=seed)
    lap("dpo")
    _, fresh = load(resolve(str(base_dir)), device="cpu")
    aligned = PeftModel.from_pretrained(fresh, str(adapter_dir)).eval()
    results["+ DPO (shipped)"] = evaluate_stage("aligned", processor, aligned, corpus_dir, plan, progress)
    lap("eval dpo")

    (work_dir / "results.json").write_text(json.dumps({"results": results, "probe": probed, "timings_s": timings, "versions": versions(), "seed": seed}, indent=2))
    plot_stages(results, work_dir / "stages.png")
    (work_dir / "report.md").write_text("# Earwitness-tiny: evaluation\n\n" + markdown(results) + "\n")
    if ship_dir is not None:
        ship(base_dir, adapter_dir, work_dir, ship_dir)
    return {"results": results, "timings_s": timings}


def _seeded(config: StageConfig, seed: int) -> StageConfig:
    from dataclasses import replace

    return replace(config, seed=seed)


SHIPPED_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "processor_config.json", "chat_template.jinja")


def ship(base_dir: Path, adapter_dir: Path, work_dir: Path, ship_dir: Path) -> None:
    """Copy base weights, processor, adapter, curves and evaluation into the committed model directory."""

    ship_dir.mkdir(parents=True, exist_ok=True)
    for name in SHIPPED_FILES:
        if (base_dir / name).exists():
            shutil.copy2(base_dir / name, ship_dir / name)
    if (ship_dir / "adapter").exists():
        shutil.rmtree(ship_dir / "adapter")
    shutil.copytree(adapter_dir, ship_dir / "adapter", ignore=shutil.ignore_patterns("*.png", "*.jsonl", "checkpoint-*", "README.md"))
    point_adapter_at(ship_dir / "adapter", ship_dir.name)
    reports = ship_dir / "training"
    reports.mkdir(exist_ok=True)
    for src, dst in (
        (work_dir / "base" / "loss.png", "base_loss.png"),
        (work_dir / "listen" / "loss.png", "listen_loss.png"),
        (work_dir / "dpo" / "dpo_curve.png", "dpo_curve.png"),
        (work_dir / "stages.png", "stages.png"),
        (work_dir / "results.json", "results.json"),
    ):
        if src.exists():
            shutil.copy2(src, reports / dst)
    write_model_card(ship_dir, json.loads((work_dir / "results.json").read_text()))
