"""LoRA scoped to the language model of an audio-language model (Qwen2-Audio, the Qwen2.5-Omni thinker).

LoRA is scoped by a regex to the language model's linear layers. Bare names (``q_proj`` …) would also
hit the Whisper-style audio encoder (``q_proj/k_proj/v_proj``) and, in Qwen2.5-Omni, the vision tower's
MLP (``gate_proj/up_proj/down_proj``). :func:`export_merged` folds a trained adapter back into the base
weights for a checkpoint that needs no PEFT.
"""

from __future__ import annotations

import os
from pathlib import Path

from models.families import family_of, language_model_lora_pattern, model_class_of_type

LM_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def lora_config(model, r: int = 16, alpha: int = 32, dropout: float = 0.05, modules_to_save: list[str] | None = None):
    """Plain LoRA on the language model's linears (what vLLM's LoRA loader understands).

    ``modules_to_save`` (e.g. ``["lm_head"]``) trains full copies of those modules; that is a PEFT-only
    extra: vLLM does not load such weights (it ignores or rejects them depending on the version).
    """
    from peft import LoraConfig

    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=language_model_lora_pattern(model),
        modules_to_save=list(modules_to_save) if modules_to_save else None,
        bias="none",
        task_type="CAUSAL_LM",
    )


# --------------------------------------------------------------------------------------------- merge


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
