"""Real parts for guard tests: the shipped verifier (or a small untrained one), a 'yes'-saying model, real clips."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import soundfile as sf

DATA = Path(__file__).resolve().parent / "data" / "guard"


def shipped_verifier() -> Path | None:
    from serving.guard.verifier import EMBEDDED_VERIFIER_DIR

    return EMBEDDED_VERIFIER_DIR if (EMBEDDED_VERIFIER_DIR / "verifier.json").exists() else None


def build_tiny_verifier(directory: Path) -> Path:
    """An untrained embedded verifier with the real text encoder and ontology phrases (serving needs only the format)."""
    import torch

    from serving.guard.scorer import AudioTextScorer, ScorerConfig
    from serving.guard.text import ontology_phrases, shared_encoder
    from serving.guard.verifier import save_embedded
    from train.ontology import load_ontology

    torch.manual_seed(0)
    onto = load_ontology()
    phrases = ontology_phrases(onto)
    emb = shared_encoder().encode([p for _, p in phrases])
    card = {"calibration": {"a": 1.0, "b": 0.0}, "thresholds": {"absent_below": 0.05, "present_above": 0.5}, "metrics": {}, "training": {}}
    save_embedded(directory, AudioTextScorer(ScorerConfig(width=16)), onto.names, phrases, emb, card)
    return directory


def verifier_dir(tmp_factory) -> Path:
    return shipped_verifier() or build_tiny_verifier(tmp_factory.mktemp("tiny-verifier"))


def build_yes_checkpoint(directory: Path) -> Path:
    """The tiny random Qwen2-Audio, made to answer "yes" to everything (the maximal hallucinator).

    Its weights are random; its generation config allows only the "yes" token and end-of-text,
    forbids ending first and repeating "yes": a real model forward whose answer ignores the audio.
    """
    from transformers import AutoTokenizer, GenerationConfig

    from tests.helpers import build_tiny_checkpoint

    build_tiny_checkpoint(directory)
    tok = AutoTokenizer.from_pretrained(directory)
    yes = tok.encode("yes", add_special_tokens=False)
    assert len(yes) == 1, f"'yes' is {yes} in the tiny tokenizer"
    y = yes[0]
    stops = {i for i in (tok.eos_token_id, tok.pad_token_id) if i is not None}
    config = GenerationConfig.from_pretrained(directory) if (directory / "generation_config.json").exists() else GenerationConfig()
    config.suppress_tokens = [i for i in range(len(tok)) if i != y and i not in stops]
    config.begin_suppress_tokens = sorted(stops)
    config.sequence_bias = [[[y, y], -1000.0]]  # the JSON-safe form of {(y, y): -1000}
    config.save_pretrained(directory)
    return directory


def clip(name: str) -> tuple[np.ndarray, int]:
    samples, sr = sf.read(DATA / f"{name}.flac", dtype="float32")
    return samples, sr


def clips_index() -> dict:
    return json.loads((DATA / "clips.json").read_text())
