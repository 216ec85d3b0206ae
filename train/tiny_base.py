"""earwitness-tiny's base stage (``earwitness train base --model tiny``): a tokenizer and a Qwen2-Audio from scratch,
its audio encoder first pretrained on the strong labels, then the supervised stage.

The later stages (``train listen``, ``train dpo``, ``eval``, ``export``) are the ones every model runs
(``train.stages``); ``train.recipe`` chains them.
"""

from __future__ import annotations

from pathlib import Path

from models.tiny import TinySize, build_untrained
from train.data.formats import read_timelines
from train.data.ontology import load_ontology
from train.data.qa import read_qa_rows
from train.data.targets import frame_targets
from train.detection_pretrain import pretrain_encoder
from train.features import feature_tag, scene_features
from train.sft import StageConfig, select_rows, train_stage

# Sized by measurement to fit the whole recipe in well under 90 minutes on 2 CPU cores.
# The base keeps the stage-0 encoder frozen: joint training from a random language model wipes
# out its sound-event knowledge and the model falls back to answer priors.
BASE = StageConfig(name="base", trainable="all_but_audio_encoder", samplings=("positive",), epochs=2.0, batch_size=16, learning_rate=1.5e-3, warmup_steps=60, turns_per_chat=4)


def corpus_texts(corpus_dir: Path) -> list[str]:
    """Every question, answer and caption the model will read or write: the tokenizer's training text."""
    return [text for row in read_qa_rows(corpus_dir, "train") for text in (row.question, row.answer)]


def stage_data(corpus_dir: Path, split: str, processor, config: StageConfig, tag: str) -> tuple:
    feats, rows_of, frames = scene_features(corpus_dir, split, processor.feature_extractor, tag)
    return feats, rows_of, frames, select_rows(read_qa_rows(corpus_dir, split), config)


def train_base(corpus_dir: Path, out_dir: Path, size: TinySize = TinySize(), config: StageConfig = BASE, vocab_size: int = 2000,
               progress: bool = True) -> list[dict]:
    """A tokenizer and a model from scratch, saved in ``out_dir``; with ``config.samplings=('positive',)`` the
    hallucinating baseline. Returns the supervised stage's history."""
    processor, model = build_untrained(corpus_texts(corpus_dir), size, vocab_size=vocab_size, seed=config.seed)
    tag = feature_tag(size)
    train = stage_data(corpus_dir, "train", processor, config, tag)
    val = stage_data(corpus_dir, "validation", processor, config, tag)
    pretrain_audio_encoder(model, corpus_dir, train, val, size, out_dir / "encoder", config.seed, progress)
    history = train_stage(model, processor.tokenizer, train, val, config, out_dir, progress=progress)
    processor.save_pretrained(out_dir)
    model.save_pretrained(out_dir)
    return history


def pretrain_audio_encoder(model, corpus_dir: Path, train: tuple, val: tuple, size: TinySize, out_dir: Path, seed: int, progress: bool) -> None:
    """Stage 0: frame-level sound-event detection on the strong labels (see train.detection_pretrain)."""

    classes = load_ontology(corpus_dir / "ontology.json").names
    positions = size.max_source_positions // 2

    def targets(split: str, data: tuple):
        timelines = read_timelines(corpus_dir, split)
        return frame_targets(timelines, data[1], classes, positions, float(size.chunk_s))

    pretrain_encoder(model, train[0], targets("train", train), out_dir, val=(val[0], targets("validation", val)), seed=seed, progress=progress)
