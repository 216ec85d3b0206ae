"""Real parts for guard tests: the shipped verifier (or a small untrained one), a 'yes'-saying model, real clips.

The clips are scenes of the small real corpus the tests build from Debian packages (no audio is
committed): one where a sound is present and the verifier judges it present, one where the same
sound is absent and the verifier judges it absent.
"""

from __future__ import annotations

from pathlib import Path

import soundfile as sf

PREFERRED = ["Door", "Walk, footsteps", "Water", "Fire", "Typing", "Glass", "Dog", "Cat", "Bell", "Speech"]

# phrases that belong to no class of the ontology (sounds it lacks, and things that are no sound at all). Each was
# checked with the real all-MiniLM-L6-v2: its nearest class stays below min_similarity (0.5) with the shipped
# 73 classes and with all 77 of train/data/ontology.json. Candidates that came too close were left out
# ("a lawnmower" 0.49 → Helicopter, "a blender" 0.48 → Tools).
OUTSIDE_ONTOLOGY = [
    "a fax machine handshake",  # nearest: Clapping (0.30, by "hand")
    "a dial-up modem connecting",  # Telephone bell ringing (0.44)
    "quantum entanglement",
    "the stock market",
    "a spreadsheet",
    "photosynthesis",
    "democracy",
    "income tax",
    "the smell of coffee",
    "a mathematical proof",
    "a theremin",  # an instrument the ontology has no class for
    "tectonic plates shifting",
    "continental drift",
    "a database query",
    "compound interest",
]


def shipped_verifier() -> Path | None:
    from models.verifier.checkpoint import EMBEDDED_VERIFIER_DIR

    return EMBEDDED_VERIFIER_DIR if (EMBEDDED_VERIFIER_DIR / "verifier.json").exists() else None


def build_tiny_verifier(directory: Path) -> Path:
    """An untrained embedded verifier with the real text encoder and ontology phrases (serving needs only the format)."""
    import torch

    from models.verifier.scorer import AudioTextScorer, ScorerConfig
    from models.verifier.text import ontology_phrases, shared_encoder
    from models.verifier.checkpoint import save_embedded
    from train.data.ontology import load_ontology

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


def pick_clips(corpus: Path) -> dict:
    """A confidently present and a confidently absent scene for one class, judged by the shipped verifier."""
    from models.verifier.checkpoint import load_verifier
    from train.data.ontology import load_ontology
    from train.data.formats import read_timelines
    from train.verifier import scene_labels

    verifier, onto = load_verifier(), load_ontology()
    cal = verifier.calibration
    scenes = []
    for split in ("train", "validation", "test"):
        for sid, timeline in sorted(read_timelines(corpus, split).items()):
            path = corpus / "scenes" / split / f"{sid}.flac"
            scenes.append((sid, path, scene_labels(timeline), verifier.class_probabilities(sf.read(path, dtype="float32")[0])))
    present_classes = {c for _, _, labels, _ in scenes for c in labels}
    for cls in PREFERRED + sorted(present_classes - set(PREFERRED)):
        phrase = onto[cls].phrases[0]
        if cls not in present_classes or verifier.match([phrase])[0].event != cls:
            continue
        pos = sorted((probs[cls], sid, path, labels) for sid, path, labels, probs in scenes if cls in labels)
        neg = sorted((probs[cls], sid, path, labels) for sid, path, labels, probs in scenes if cls not in labels)
        if pos and neg and pos[-1][0] >= cal.present_above + 0.05 and neg[0][0] < cal.absent_below - 0.05:
            return {
                kind: {"path": path, "scene_id": sid, "event": cls, "phrase": phrase, "labels": sorted(labels), "probability": p}
                for kind, (p, sid, path, labels) in (("present", pos[-1]), ("absent", neg[0]))
            }
    raise AssertionError("the verifier finds no class confidently present in one scene and absent in another")


def metric_total(text: str, prefix: str) -> float:
    """The sum of every sample of a Prometheus exposition whose line starts with ``prefix`` (all label sets)."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))


def verifier_clips(text: str) -> dict[str, float]:
    """``earwitness_verifier_clips_total`` by result (scored, kept, shared) in an exposition."""
    return {r: metric_total(text, f'earwitness_verifier_clips_total{{result="{r}"}}') for r in ("scored", "kept", "shared")}
