"""earwitness-small: a Qwen2-Audio assembled from pretrained parts plus the few tensors ``train/`` trains.

The audio tower is a pretrained Whisper encoder and the language model is SmolLM2-135M-Instruct
(as Qwen2) cut to its first ``lm_layers`` layers, both fetched from pinned wheels by
``models.pretrained``. What training adds is small: the audio projector, the three audio tokens'
embeddings (``trained.safetensors``), the base stage's LoRA on the language model (``base_lora/``; with
``trained_layers`` the committed layers hold it, merged)
and the aligned adapter (``adapter/``). Only those are committed. :func:`assemble` joins parts and
trained tensors into an ordinary Qwen2-Audio checkpoint once, in the cache, so every engine that
serves Qwen2-Audio (transformers, vLLM) loads it like any other.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from models.pretrained import POSITIONS_PER_SECOND, provenance, smollm2_qwen2, whisper_encoder, whisper_feature_extractor
from models.pretrained.parts import PARTS
from models.pretrained.store import build_once
from models.tiny import AUDIO, AUDIO_BOS, AUDIO_EOS, CHAT_TEMPLATE, chatml_tokenizer

PARTS_FILE = "earwitness_parts.json"
TRAINED_FILE = "trained.safetensors"
BASE_LORA_DIR = "base_lora"
PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "processor_config.json", "chat_template.jinja")
_TRAINED_PREFIXES = ("model.multi_modal_projector.",)
LM_TRAINED_PARTS = ("layers.", "norm.")  # of the language model, with ``trained_layers``: the lookup stage's (not the word embeddings)
_LM_PREFIXES = tuple(f"model.language_model.{p}" for p in LM_TRAINED_PARTS)


@dataclass(frozen=True)
class SmallSpec:
    """Which pretrained parts, and how much of the language model, the small model is made of."""

    encoder: str = "whisper-tiny.en"
    language_model: str = "smollm2-135m-instruct"
    lm_layers: int = 4
    window_s: int = 10
    trained_layers: bool = False  # the language model's layers were trained too (the lookup stage), so they are committed
    tower_layers: tuple[int, ...] = ()  # the audio tower's layers distilled from the AudioSet tagger (train/tower.py), committed

    def __post_init__(self):
        object.__setattr__(self, "tower_layers", tuple(self.tower_layers))  # a list from JSON

    @property
    def audio_tokens(self) -> int:
        """Audio tokens a full window gives the language model (the tower's positions, pooled by two)."""

        return self.window_s * POSITIONS_PER_SECOND // 2

    @property
    def tower_prefixes(self) -> tuple[str, ...]:
        """The tower's trained layers and, with them, its final norm."""
        layers = tuple(f"model.audio_tower.layers.{i}." for i in self.tower_layers)
        return layers + ("model.audio_tower.layer_norm.",) if layers else ()

    @property
    def trained_prefixes(self) -> tuple[str, ...]:
        return _TRAINED_PREFIXES + (_LM_PREFIXES if self.trained_layers else ()) + self.tower_prefixes


def is_assembled_checkpoint(path: str | Path) -> bool:
    """A directory holding trained tensors and the recipe of parts they complete."""
    return (Path(path) / PARTS_FILE).exists()


def read_spec(path: str | Path) -> SmallSpec:
    return SmallSpec(**json.loads((Path(path) / PARTS_FILE).read_text())["spec"])


def build_tokenizer(lm_tokenizer):
    """The language model's tokenizer with Qwen2-Audio's three audio tokens added as special tokens."""
    backend = lm_tokenizer.backend_tokenizer.__class__.from_str(lm_tokenizer.backend_tokenizer.to_str())
    backend.add_special_tokens([AUDIO, AUDIO_BOS, AUDIO_EOS])
    return chatml_tokenizer(backend)


def build_untrained(spec: SmallSpec = SmallSpec(), seed: int = 0, tower: str | None = None):
    """``(processor, Qwen2AudioForConditionalGeneration)`` from the pinned pretrained parts; projector random.
    ``tower``: a Whisper directory to take the audio tower from instead (a distilled tower, ``train.tower``), whose
    ``spec.tower_layers`` are then the trained ones that get committed."""

    tower = whisper_encoder(tower or spec.encoder, max_source_positions=spec.window_s * POSITIONS_PER_SECOND)
    lm, lm_tokenizer = smollm2_qwen2(num_layers=spec.lm_layers, source=spec.language_model)
    return build_from_parts(tower, lm, lm_tokenizer, spec, seed)


def build_from_parts(tower, lm, lm_tokenizer, spec: SmallSpec, seed: int = 0):
    """Join a ``Qwen2AudioEncoder`` and a ``Qwen2ForCausalLM`` (tied embeddings) into one Qwen2-Audio."""
    from transformers import Qwen2AudioConfig, Qwen2AudioForConditionalGeneration, Qwen2AudioProcessor

    torch.manual_seed(seed)
    tokenizer = build_tokenizer(lm_tokenizer)
    extractor = whisper_feature_extractor(chunk_length=spec.window_s, num_mel_bins=tower.config.num_mel_bins)
    processor = Qwen2AudioProcessor(feature_extractor=extractor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)
    text_config = lm.config.to_dict()
    text_config.update(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                       tie_word_embeddings=True)
    config = Qwen2AudioConfig(
        audio_config=tower.config.to_dict(),
        text_config=text_config,
        audio_token_index=tokenizer.convert_tokens_to_ids(AUDIO),
        tie_word_embeddings=True,
    )
    config.earwitness_small_spec = asdict(spec)
    model = Qwen2AudioForConditionalGeneration(config)
    model.model.audio_tower.load_state_dict(tower.state_dict())
    with quiet_transformers():  # its note on initialising the new rows: the audio tokens' rows are trained ones, loaded after
        lm.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    model.model.language_model.load_state_dict(lm.model.state_dict())
    model.lm_head.weight = model.model.language_model.embed_tokens.weight  # SmolLM2 ties them
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return processor, model.float().eval()


@contextlib.contextmanager
def quiet_transformers():
    """transformers' own log at errors only inside the block."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def audio_token_ids(tokenizer) -> list[int]:
    return tokenizer.convert_tokens_to_ids([AUDIO, AUDIO_BOS, AUDIO_EOS])


def trained_tensors(model, tokenizer, spec: SmallSpec) -> dict[str, torch.Tensor]:
    """What training adds to the parts: the projector, the audio tokens' embedding rows and (``trained_layers``,
    ``tower_layers``) the language model's and the tower's layers, those in float16 (half the bytes committed; their
    values sit well inside its range)."""
    sd = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items() if k.startswith(spec.trained_prefixes)}
    sd = {k: v.half() if k.startswith(_LM_PREFIXES + spec.tower_prefixes) else v for k, v in sd.items()}
    embed = model.model.language_model.embed_tokens.weight
    sd["audio_token_embeddings"] = embed[audio_token_ids(tokenizer)].detach().clone()
    return sd


def save_trained(model, processor, out_dir: Path, spec: SmallSpec, base_lora: Path | None = None) -> None:
    """Write the committed form: trained tensors, processor, the parts recipe (and the base LoRA)."""
    import shutil

    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(trained_tensors(model, processor.tokenizer, spec), str(out_dir / TRAINED_FILE))
    processor.save_pretrained(out_dir)
    if base_lora is not None and base_lora.resolve() != (out_dir / BASE_LORA_DIR).resolve():
        shutil.rmtree(out_dir / BASE_LORA_DIR, ignore_errors=True)
        shutil.copytree(base_lora, out_dir / BASE_LORA_DIR, ignore=shutil.ignore_patterns("README.md", "*.png", "*.jsonl"))
    parts = {"spec": asdict(spec), "parts": {p: provenance(p) for p in (spec.encoder, spec.language_model) if p in PARTS}}
    (out_dir / PARTS_FILE).write_text(json.dumps(parts, indent=2) + "\n")


def load_trained(model, tokenizer, ckpt: Path) -> None:
    """Put a checkpoint's trained tensors (and merge its base LoRA) into a model built from the parts."""
    from safetensors.torch import load_file

    sd = {k: v.float() for k, v in load_file(str(ckpt / TRAINED_FILE)).items()}
    rows = sd.pop("audio_token_embeddings")
    missing = [k for k in model.state_dict() if k.startswith(read_spec(ckpt).trained_prefixes) and k not in sd]
    if missing:
        raise ValueError(f"{ckpt / TRAINED_FILE} lacks {missing}")
    model.load_state_dict(sd, strict=False)
    with torch.no_grad():
        model.model.language_model.embed_tokens.weight[audio_token_ids(tokenizer)] = rows
    if (ckpt / BASE_LORA_DIR).exists() and not read_spec(ckpt).trained_layers:  # committed layers already hold their LoRA
        merge_lora(model, ckpt / BASE_LORA_DIR)


def merge_lora(model, adapter_dir: Path) -> None:
    """Fold a PEFT LoRA into ``model``'s weights in place (the base stage's LoRA becomes the base)."""
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(model, str(adapter_dir))
    peft_model.merge_and_unload()


def untie_head(model) -> None:
    """Give the LM head its own copy of the embeddings, and say so in the config.

    transformers' Qwen2-Audio declares no tied weights, so it refuses to save shared tensors; and
    vLLM reads a config that claims tied embeddings as having no ``lm_head`` of its own. A copy is
    the same function in the form both read (28 M parameters more in the cache, none committed).
    """
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    model.config.tie_word_embeddings = False
    model.config.text_config.tie_word_embeddings = False


def fingerprint(ckpt: Path) -> str:
    """A short hash of everything that decides the assembled weights."""
    h = hashlib.sha256()
    files = [ckpt / PARTS_FILE, ckpt / TRAINED_FILE, *sorted((ckpt / BASE_LORA_DIR).glob("*"))]
    for f in files:
        if f.is_file():
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def assemble(ckpt: str | Path, progress: bool = True) -> Path:
    """The full Qwen2-Audio checkpoint for ``ckpt``, built once in the cache from parts + trained tensors."""

    ckpt = Path(ckpt).resolve()
    spec = read_spec(ckpt)

    def build(out: Path) -> None:
        if progress:
            print(f"[earwitness] assembling {ckpt.name} from {spec.encoder} + {spec.language_model}[:{spec.lm_layers}] (once)", flush=True)
        processor, model = build_untrained(spec)
        load_trained(model, processor.tokenizer, ckpt)
        untie_head(model)
        model.save_pretrained(out)
        for name in PROCESSOR_FILES:
            if (ckpt / name).exists():
                (out / name).write_bytes((ckpt / name).read_bytes())

    return build_once(f"assembled/{ckpt.name}-{fingerprint(ckpt)}", build)
