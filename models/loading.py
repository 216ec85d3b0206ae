"""Load a registered model (processor + weights, optionally a LoRA adapter) from disk or the hub."""

from __future__ import annotations

from pathlib import Path

import torch

from models.registry import ModelSpec


def _model_class(family: str):
    import transformers

    classes = {
        "qwen2-audio": "Qwen2AudioForConditionalGeneration",
        "qwen2.5-omni-thinker": "Qwen2_5OmniThinkerForConditionalGeneration",
    }
    if family not in classes:
        raise ValueError(f"unsupported model family {family!r}; known: {', '.join(classes)}")
    return getattr(transformers, classes[family])


def pick_device(requested: str = "auto") -> str:
    if requested != "auto":
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def pick_dtype(device: str, requested: str = "auto") -> torch.dtype:
    if requested != "auto":
        return getattr(torch, requested)
    return torch.bfloat16 if device.startswith("cuda") else torch.float32


def load(spec: ModelSpec, adapter: str | None = None, device: str = "auto", dtype: str = "auto"):
    """Return ``(processor, model)`` in eval mode; a local directory never touches the network."""
    from transformers import AutoProcessor

    local = Path(spec.source).is_dir()
    if not local and spec.source.startswith(("/", ".")):
        raise FileNotFoundError(f"model directory {spec.source} does not exist")
    device = pick_device(device)
    processor = AutoProcessor.from_pretrained(spec.source, local_files_only=local)
    model = _model_class(spec.family).from_pretrained(spec.source, local_files_only=local, dtype=pick_dtype(device, dtype))
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter, is_trainable=False)
    model.to(device).eval()
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"  # batched generation appends after the prompt
    return processor, model
