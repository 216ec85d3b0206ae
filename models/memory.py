"""The production architectures' configs, written here (nothing downloaded), and the GPU memory a DPO step needs.

:func:`production_config` gives Qwen2-Audio-7B-Instruct's and the Qwen2.5-Omni-7B thinker's architecture as their
hub ``config.json`` files state it; :func:`count_parameters` builds the model on the meta device (no memory) and counts
its parameters by part. :func:`dpo_memory` adds up what one DPO step holds on one GPU:

* weights: parameters × 2 bytes (bf16); under QLoRA the language model's linears take 4.127 bits a parameter (NF4
  with double-quantised block scales), everything else stays bf16;
* LoRA (r=16 on the 7 linears of every decoder layer): fp32 weights, gradients and Adam's two moments (16 bytes a
  parameter);
* activations of the policy's forward kept for the backward: per decoder layer and token ``34·h`` bytes in bf16
  (Korthikanti et al. 2022, with fused attention), or only the layer's input (``2·h``) plus one layer recomputed
  under gradient checkpointing; the reference forward runs without gradients and keeps none;
* the logits of the chosen and rejected sequences in fp32 (TRL's log-softmax), twice (policy and reference).

CUDA's context and allocator slack (about 1 GiB) come on top. ``python -m models.memory`` prints the README table.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

QLORA_BITS = 4.127  # NF4 + a double-quantised fp32 absmax per 64 weights
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# The published architectures, as their hub config.json files state them (loadtests/bench_gpu_decode.py serves them too)
QWEN2_AUDIO_7B = {
    "audio_config": dict(d_model=1280, encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120, num_mel_bins=128, max_source_positions=1500),
    "text_config": dict(model_type="qwen2", vocab_size=156032, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=8192, rms_norm_eps=1e-5,
                        rope_theta=10000.0, tie_word_embeddings=False),
}
QWEN25_OMNI_7B_THINKER = {
    "audio_config": dict(d_model=1280, encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120, num_mel_bins=128,
                         max_source_positions=1500, n_window=100, output_dim=3584),
    "vision_config": dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584, patch_size=14,
                          spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31]),
    "text_config": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                        num_key_value_heads=4, max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=False,
                        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}),
}


def production_config(family: str):
    """The 7B configs: Qwen2-Audio-7B-Instruct (``qwen2-audio``) and the Qwen2.5-Omni-7B thinker, with their token ids."""
    from transformers import Qwen2_5OmniThinkerConfig, Qwen2AudioConfig

    if family == "qwen2-audio":
        return Qwen2AudioConfig(**QWEN2_AUDIO_7B, audio_token_index=151646)
    if family == "qwen2.5-omni-thinker":
        config = Qwen2_5OmniThinkerConfig(**QWEN25_OMNI_7B_THINKER, audio_token_index=151646, image_token_index=151655,
                                          video_token_index=151656, audio_start_token_id=151647, audio_end_token_id=151648,
                                          user_token_id=872)
        config.vision_start_token_id = 151652  # the hub config carries it; the rope index reads it for audio-only prompts too
        return config
    raise ValueError(f"no production config for {family!r}")


@dataclass(frozen=True)
class Counts:
    """Parameters of one architecture, by part."""

    total: int
    lm_linear: int  # the decoder layers' linears: what QLoRA quantises and LoRA adapts
    lora: int  # LoRA r=16 on those linears
    hidden: int
    layers: int
    vocab: int


def count_parameters(config, lora_r: int = 16) -> Counts:
    """Count on the meta device: the real module tree, no weights allocated."""
    from models.families import model_class_of_type

    with torch.device("meta"):
        model = model_class_of_type(config.model_type)(config)
    text = config.text_config
    lm_linear = lora = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".language_model.layers." in f".{name}" and name.rsplit(".", 1)[-1] in LORA_TARGETS:
            lm_linear += module.weight.numel()
            lora += lora_r * (module.in_features + module.out_features)
    return Counts(sum(p.numel() for p in model.parameters()), lm_linear, lora, text.hidden_size, text.num_hidden_layers, text.vocab_size)


def dpo_memory(counts: Counts, mode: str, pairs: int = 1, tokens: int = 800) -> dict[str, float]:
    """GiB one DPO step holds for ``pairs`` pairs of ``tokens``-token sequences (a 30 s clip is 750 audio tokens) under
    ``mode``: ``bf16``, ``bf16+gc`` or ``qlora`` (4-bit base, with gradient checkpointing)."""
    gib = 1 / 2**30
    rows = 2 * pairs * tokens  # chosen and rejected
    if mode == "qlora":
        weights = counts.lm_linear * QLORA_BITS / 8 + (counts.total - counts.lm_linear) * 2
    else:
        weights = counts.total * 2
    lora = counts.lora * 16
    if mode == "bf16":
        activations = counts.layers * rows * 34 * counts.hidden
    else:  # checkpointed: every layer's input, and one layer's full activations while it is recomputed
        activations = counts.layers * rows * 2 * counts.hidden + rows * 34 * counts.hidden
    logits = 2 * rows * counts.vocab * 4
    parts = {"weights": weights, "lora+adam": lora, "activations": activations, "logits": logits}
    return {**{k: v * gib for k, v in parts.items()}, "total": sum(parts.values()) * gib}


def table(pairs: int = 1, tokens: int = 800) -> str:
    lines = [f"| model | params | mode | weights | LoRA + Adam | activations | logits | total (GiB, {pairs} pair × {tokens} tokens) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for family, name in (("qwen2-audio", "Qwen2-Audio-7B-Instruct"), ("qwen2.5-omni-thinker", "Qwen2.5-Omni-7B thinker")):
        counts = count_parameters(production_config(family))
        for mode in ("bf16", "bf16+gc", "qlora"):
            m = dpo_memory(counts, mode, pairs, tokens)
            lines.append(f"| {name} | {counts.total / 1e9:.2f} B | {mode} | {m['weights']:.1f} | {m['lora+adam']:.2f} | {m['activations']:.1f} | "
                         f"{m['logits']:.1f} | **{m['total']:.1f}** |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
