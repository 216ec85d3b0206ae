"""LoRA scoped to the language model of an audio-language model (Qwen2-Audio, the Qwen2.5-Omni thinker).

LoRA is scoped by a regex to the language model's linear layers. Bare names (``q_proj`` …) would also
hit the Whisper-style audio encoder (``q_proj/k_proj/v_proj``) and, in Qwen2.5-Omni, the vision tower's
MLP (``gate_proj/up_proj/down_proj``). :func:`models.loading.export_merged` folds a trained adapter back into the
base weights for a checkpoint that needs no PEFT.
"""

from __future__ import annotations

from models.families import language_model_lora_pattern

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

