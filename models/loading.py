"""Load a registered model (processor + weights, optionally a LoRA adapter) from disk or the hub."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from models.families import family_of, model_class, model_class_of_type
from models.registry import ModelSpec

# PEFT asks every model it wraps for transformers' deprecated ``is_gradient_checkpointing``; the FutureWarning is
# about PEFT's code, not ours, and would print on every replica start and adapter load.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning, module="transformers.modeling_utils")


def pick_device(requested: str = "auto") -> str:
    if requested != "auto":
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def pick_dtype(device: str, requested: str = "auto") -> torch.dtype:
    if requested != "auto":
        return getattr(torch, requested)
    return torch.bfloat16 if device.startswith("cuda") else torch.float32


def checkpoint_source(spec: ModelSpec) -> str:
    """What ``from_pretrained`` reads for ``spec``: its source, or, for a model committed as trained
    tensors over pretrained parts (``models.small``), the full checkpoint assembled once in the cache."""
    from models.small import assemble, is_assembled_checkpoint

    return str(assemble(spec.source)) if is_assembled_checkpoint(spec.source) else spec.source


def tower_signature(encoder: str, window_s: int) -> str:
    """Names a frozen pretrained audio tower and its window, e.g. ``whisper-tiny.en@10s``: two models whose
    towers have the same signature compute the same layers for the same clip."""
    return f"{encoder}@{window_s}s"


def frozen_tower(spec: ModelSpec) -> str | None:
    """The signature of ``spec``'s audio tower when it is a pretrained part as fetched (a model committed as
    trained tensors over pretrained parts, ``models.small``, whose tower was not distilled), else None."""
    from models.small import is_assembled_checkpoint, read_spec

    if not is_assembled_checkpoint(spec.source):
        return None
    parts = read_spec(spec.source)
    if parts.tower_layers:  # distilled: not the part as fetched
        return None
    return tower_signature(parts.encoder, parts.window_s)


def load(spec: ModelSpec, adapter: str | None = None, device: str = "auto", dtype: str = "auto"):
    """Return ``(processor, model)`` in eval mode; a local directory never touches the network."""
    device = pick_device(device)
    processor, model = _from_pretrained(spec, dtype=pick_dtype(device, dtype))
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter, is_trainable=False)
    model.to(device).eval()
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"  # batched generation appends after the prompt
    return processor, model


def load_for_training(spec: ModelSpec, bf16: bool = False, load_in_4bit: bool = False):
    """``(processor, model)`` to train on: in bfloat16 or float32, or with the language model in 4-bit NF4 (QLoRA,
    bitsandbytes on a CUDA device; the audio tower, the audio adapter, Omni's vision tower and the LM head stay in
    bfloat16, since LISTEN trains the adapter and the tower's convolutions have no 4-bit kernels)."""
    quantization = None
    if load_in_4bit:
        try:
            import bitsandbytes  # noqa: F401  (optional: only QLoRA needs it)
        except ImportError as e:
            raise SystemExit("--load-in-4bit (QLoRA) needs bitsandbytes: pip install bitsandbytes (a CUDA GPU runs it)") from e
        if not torch.cuda.is_available():
            raise SystemExit("--load-in-4bit (QLoRA) needs a CUDA GPU: bitsandbytes' 4-bit training kernels run there")
        from transformers import BitsAndBytesConfig

        from models.families import family

        keep = ["audio_tower", "visual", "lm_head", *family(spec.family).audio_adapter]
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                          bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=keep)
    dtype = torch.bfloat16 if bf16 or load_in_4bit else torch.float32
    processor, model = _from_pretrained(spec, dtype, quantization)
    if load_in_4bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)  # the trainer switches it on
    return processor, model  # the trainer places it (each data-parallel worker on its own device)


def _from_pretrained(spec: ModelSpec, dtype: torch.dtype, quantization=None):
    from transformers import AutoProcessor

    source = checkpoint_source(spec)
    local = Path(source).is_dir()
    if not local and source.startswith(("/", ".")):
        raise FileNotFoundError(f"model directory {source} does not exist")
    processor = _processor(spec, source, local)
    extra = {"quantization_config": quantization, "device_map": {"": torch.cuda.current_device()}} if quantization is not None else {}
    model = model_class(spec.family).from_pretrained(source, local_files_only=local, dtype=dtype, **extra)
    return processor, model


def _processor(spec: ModelSpec, source: str, local: bool):
    """The checkpoint's processor; for the Omni thinker, an audio-only one where the stock one needs torchvision (or the
    checkpoint saved none)."""
    from transformers import AutoProcessor

    if spec.family != "qwen2.5-omni-thinker":
        return AutoProcessor.from_pretrained(source, local_files_only=local)
    from models.omni import load_audio_omni_processor

    try:
        processor = AutoProcessor.from_pretrained(source, local_files_only=local)
    except ImportError:  # the video processor's torchvision
        processor = None
    return processor if hasattr(processor, "feature_extractor") else load_audio_omni_processor(source, local)


def export_merged(base_model, adapter_dir: str | Path, out_dir: str | Path, processor=None) -> Path:
    """Merge a LoRA adapter into the base weights and save a full checkpoint (weights + processor).

    ``base_model`` is a checkpoint directory or a loaded, *untouched* base model (not the instance that
    :func:`train.dpo.train_dpo` trained in place, which already carries LoRA layers). The processor is taken from
    ``processor``, else from the base checkpoint directory, else from ``adapter_dir`` (``train_dpo``
    saves one there). The result loads with ``from_pretrained`` and needs no PEFT.
    """
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    source = None
    if isinstance(base_model, (str, os.PathLike)):
        from transformers import AutoConfig

        source = Path(base_model)
        config = AutoConfig.from_pretrained(source, local_files_only=source.is_dir())
        base_model = model_class_of_type(config.model_type).from_pretrained(source, local_files_only=source.is_dir(), dtype="auto")
    if hasattr(base_model, "peft_config") or any(isinstance(m, BaseTunerLayer) for m in base_model.modules()):
        raise ValueError("export_merged needs a base model without LoRA layers (pass its checkpoint directory)")
    family_of(base_model)  # raises on a model of another family
    merged = PeftModel.from_pretrained(base_model, str(adapter_dir)).merge_and_unload()
    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(out_dir))
    if processor is None:
        from transformers import AutoProcessor

        for candidate in (source, adapter_dir):
            if candidate is not None and candidate.is_dir() and (candidate / "tokenizer_config.json").exists():
                processor = AutoProcessor.from_pretrained(candidate, local_files_only=True)
                break
    if processor is None:
        raise ValueError("no processor given and none found next to the base model or the adapter")
    processor.save_pretrained(str(out_dir))
    return out_dir


def merged_checkpoint(source: str, adapter_dir: str, cache: Path | None = None) -> Path:
    """``source`` with the LoRA ``adapter_dir`` merged into its weights, made once per (base, adapter) in the store cache.

    For an engine whose implementation of the family takes no LoRA (vLLM's Qwen2-Audio): the replica serves the
    merged weights. Keyed by both directories' listings (names, sizes, modification times); built under a temporary
    name and renamed, so replicas sharing the cache merge once and never read a half-written checkpoint.
    """
    import hashlib
    import json
    import shutil
    import uuid

    from models.store import store_cache

    def listing(directory: str) -> list:
        root = Path(directory)
        return sorted((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file())

    key = hashlib.sha256(json.dumps([str(Path(source).resolve()), listing(source), listing(adapter_dir)]).encode()).hexdigest()[:16]
    target = (cache or store_cache()) / f"merged-{Path(adapter_dir).name[:40]}-{key}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".partial-{target.name}-{uuid.uuid4().hex[:8]}"
    try:
        export_merged(source, adapter_dir, staging)
        try:
            staging.rename(target)
        except OSError:  # another replica merged it first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
