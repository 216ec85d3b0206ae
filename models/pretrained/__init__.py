"""Pretrained parts shipped as plain files in pinned PyPI wheels, converted once into transformers models.

``whisper_encoder`` gives Qwen2-Audio's audio tower from Whisper, ``whisper_feature_extractor`` its
log-mel front end, ``whisper_model`` the whole Whisper (with processor), ``smollm2_qwen2`` SmolLM2
as a Qwen2 language model, ``provenance`` where each came from. Conversions are cached under
``<cache>/pretrained/<name>/``.
"""

from models.pretrained.provenance import provenance, provenance_markdown
from models.pretrained.smollm2 import gguf_llama, qwen2_from_llama, smollm2_qwen2
from models.pretrained.whisper import (
    POSITIONS_PER_SECOND,
    load_whisper,
    qwen2_audio_encoder,
    whisper_encoder,
    whisper_feature_extractor,
    whisper_model,
)

__all__ = [
    "POSITIONS_PER_SECOND",
    "gguf_llama",
    "load_whisper",
    "provenance",
    "provenance_markdown",
    "qwen2_audio_encoder",
    "qwen2_from_llama",
    "smollm2_qwen2",
    "whisper_encoder",
    "whisper_feature_extractor",
    "whisper_model",
]
