"""The model families Earwitness serves and trains, and what code needs to know of their architecture.

One table for the two Qwen audio families: ``qwen2-audio`` (Qwen2-Audio-7B-Instruct, and earwitness-small, which is
one) and ``qwen2.5-omni-thinker`` (the thinker of Qwen2.5-Omni-7B). Each row names the family as the registry does,
transformers' ``model_type`` and the class transformers and vLLM both call it. The accessors below find a model's
parts whether PEFT wraps it or not: the audio tower, the language model, and the LoRA pattern that adapts the
language model's linears and nothing else (a bare ``target_modules`` name such as ``q_proj`` would also hit the
Whisper tower's attention). A new family is a row here, a loader case in ``models/loading.py`` if its processor
differs, and nothing else.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    name: str  # as ``models.registry`` and the configs name it
    model_type: str  # transformers' ``config.model_type``
    architecture: str  # the class name in transformers and in vLLM's registry
    audio_adapter: tuple[str, ...]  # the modules between the audio tower and the language model (what LISTEN trains)


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("qwen2-audio", "qwen2_audio", "Qwen2AudioForConditionalGeneration", ("multi_modal_projector",)),
    # Omni has no separate projector: the audio encoder's last norm and linear map into the language model's width
    Family("qwen2.5-omni-thinker", "qwen2_5_omni_thinker", "Qwen2_5OmniThinkerForConditionalGeneration", ("audio_tower.ln_post", "audio_tower.proj")),
)}
_BY_MODEL_TYPE = {f.model_type: f for f in FAMILIES.values()}


def family(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"unsupported model family {name!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def model_class(name: str):
    """The transformers class of a family."""
    import transformers

    return getattr(transformers, family(name).architecture)


def model_class_of_type(model_type: str):
    """The transformers class of a checkpoint's ``config.model_type``."""
    if model_type not in _BY_MODEL_TYPE:
        raise ValueError(f"unsupported model type {model_type!r}; known: {', '.join(_BY_MODEL_TYPE)}")
    return model_class(_BY_MODEL_TYPE[model_type].name)


def unwrap(model):
    """The model under a PEFT wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) and hasattr(model, "peft_config") else model


def family_of(model) -> Family:
    """A loaded model's family, from its ``config.model_type``."""
    model = unwrap(model)
    model_type = getattr(model.config, "model_type", None)
    if model_type not in _BY_MODEL_TYPE:
        raise ValueError(f"unsupported model type {model_type!r} ({type(model).__name__}); known: {', '.join(_BY_MODEL_TYPE)}")
    return _BY_MODEL_TYPE[model_type]


def audio_tower(model):
    """The audio encoder (``model.audio_tower`` in both families under transformers 5), or None."""
    return getattr(getattr(unwrap(model), "model", None), "audio_tower", None)


def tower_modules(model) -> list[str]:
    """The audio tower's module names, as an adapter's ``target_modules`` would name them."""
    return [name for name, _ in unwrap(model).named_modules() if "audio_tower" in name.split(".")]


def language_model_prefix(model) -> str:
    """The module path of the text decoder, e.g. ``model.language_model`` (both families in transformers 5)."""
    model = unwrap(model)
    family_of(model)
    target = getattr(getattr(model, "model", None), "language_model", None)
    if target is None:
        target = model.get_decoder()
    for name, module in model.named_modules():
        if module is target:
            return name
    raise ValueError(f"cannot locate the language model inside {type(model).__name__}")


def language_model_lora_pattern(model) -> str:
    """A PEFT ``target_modules`` regex (full match) for the decoder's attention and MLP linears only.

    For both families under transformers 5 this is
    ``model\\.language_model\\.layers\\.\\d+\\.(?:self_attn\\.(?:q_proj|…|o_proj)|mlp\\.(?:gate_proj|…))``;
    the audio tower, the projector and Omni's vision tower (``model.visual``) stay untouched. Raises if the
    pattern matches nothing.
    """
    import torch  # here, not at the top: the registry (`earwitness models`) reads the family table without torch

    prefix = re.escape(language_model_prefix(model))
    pattern = rf"{prefix}\.layers\.\d+\.(?:self_attn\.(?:q_proj|k_proj|v_proj|o_proj)|mlp\.(?:gate_proj|up_proj|down_proj))"
    names = [n for n, m in unwrap(model).named_modules() if isinstance(m, torch.nn.Linear) and re.fullmatch(pattern, n)]
    if not names:
        raise ValueError(f"LoRA pattern {pattern!r} matches no linear layer of {type(unwrap(model)).__name__}")
    return pattern


def audio_adapter_modules(model) -> list[str]:
    """The audio adapter's module names as PEFT's ``modules_to_save`` takes them (suffixes of module paths)."""
    names = [n for n, _ in unwrap(model).named_modules()]
    found = [suffix for suffix in family_of(model).audio_adapter if any(n == suffix or n.endswith("." + suffix) for n in names)]
    if not found:
        raise ValueError(f"no audio adapter ({family_of(model).audio_adapter}) in {type(unwrap(model)).__name__}")
    return found
