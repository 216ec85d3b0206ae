"""The whole recipe: corpus → tokenizer → base (from scratch) → LISTEN → DPO → evaluation → shipped model.

``earwitness train recipe --corpus DIR --out DIR`` runs it; each stage can also run alone.
"""

from __future__ import annotations

import json
import platform
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch

from models.tiny import TinySize, build_untrained
from train.features import scene_features
from train.qa import read_qa_rows
from train.sft import StageConfig, select_rows, train_stage

BASE = StageConfig(name="base", samplings=("positive",), epochs=2.0, batch_size=16, learning_rate=1.5e-3, warmup_steps=80)
LISTEN = StageConfig(name="listen", trainable="audio_adapter", epochs=0.5, batch_size=16, learning_rate=2e-3, warmup_steps=20, caption_share=0.1)


def corpus_texts(corpus_dir: Path) -> list[str]:
    """Every question, answer and caption the model will read or write: the tokenizer's training text."""
    texts = []
    for split in ("train",):
        for row in read_qa_rows(corpus_dir, split):
            texts += [row.question, row.answer]
    return texts


def stage_data(corpus_dir: Path, split: str, processor, config: StageConfig, tag: str) -> tuple:
    feats, rows_of, frames = scene_features(corpus_dir, split, processor.feature_extractor, tag)
    return feats, rows_of, frames, select_rows(read_qa_rows(corpus_dir, split), config)


def versions() -> dict:
    import peft
    import transformers
    import trl

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__, "trl": trl.__version__}


def train_base(corpus_dir: Path, out_dir: Path, size: TinySize = TinySize(), config: StageConfig = BASE, vocab_size: int = 2000, progress: bool = True):
    """Stage 1: a tokenizer and a model from scratch; with ``config.samplings=('positive',)`` the hallucinating baseline."""
    processor, model = build_untrained(corpus_texts(corpus_dir), size, vocab_size=vocab_size, seed=config.seed)
    tag = f"mel{size.mel_bins}-hop{size.hop_length}-{size.chunk_s}s"
    train = stage_data(corpus_dir, "train", processor, config, tag)
    val = stage_data(corpus_dir, "validation", processor, config, tag)
    train_stage(model, processor.tokenizer, train, val, config, out_dir, progress=progress)
    processor.save_pretrained(out_dir)
    model.save_pretrained(out_dir)
    return processor, model
