"""earwitness-small's own stages, each one ``earwitness train`` command over directories (``train.recipe`` chains them).

The audio tower (Whisper, or its distilled form: ``--tower``) and the language model (SmolLM2 cut to ``lm_layers``) come
from ``models.small``; the supervised stages read the tower's cached outputs (``train.cached_tower``), so the tower runs
once per scene. Every stage's directory is a checkpoint in committed form (``models.small.save_trained``), so the next
stage, ``eval`` and ``serve`` load it by name.

1. **base** (``train base --model small``) — the hallucinating baseline: projector + a LoRA on the cut language model
   learn captions and presence / order / count / duration questions with the absent-sound questions left out. The
   LoRA is saved beside the trained tensors and merged when the checkpoint is assembled.
2. **lookup** (``train lookup``) — text before audio: the base's language-model layers and final norm (the word
   embeddings stay frozen) learn every question kind, absent sounds included and presence asked in every trained
   phrasing, over the sounds' written names laid at the served audio positions, in the served chat layout
   (``train.lookup.fit_lookup``, one pass over a scene's audio for all its questions, a Yes/No margin beside the
   answers' cross-entropy). Gate 1 is measured on the layers it commits: validation oracle ROC-AUC ≥ 0.93.
3. **LISTEN** — the language model frozen, only the audio side learns. ``train listen --projector names`` fits the
   projector in closed form onto the names the lookup reads (``fit_projector_to_names``); ``--projector lookup``
   starts there and trains the tower's top layers, its final norm and the projector through the frozen lookup on
   present and absent sounds (``train.audio_path``): gate 2, validation served ROC-AUC ≥ 0.85.
4. **DPO** (``train dpo``, the stage every model runs) — LoRA r=16, α=32 on the language model over LISTEN + AHA ×4 +
   ACPO pairs; the LISTEN projector is committed as fitted.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from models.families import unwrap
from models.small import BASE_LORA_DIR, LM_TRAINED_PARTS, PARTS_FILE, PROCESSOR_FILES, TRAINED_FILE, SmallSpec, build_untrained, load_trained, read_spec, save_trained
from train.audio_path import AudioPathFit, fit_audio_path, heard_tokens
from train.binding import checkpoint_lm
from train.lookup import LookupFit, fit_lookup, mix_names, name_embeddings, phrase_word_ids, pool_positions
from train.cached_tower import EncodedForward, collate_encoded
from train.data.formats import read_timelines
from train.data.ontology import load_ontology
from train.data.qa import read_qa_rows
from train.data.targets import frame_targets
from train.features import encoder_features
from train.gates import stage_gate
from train.lora import lora_config
from train.model_card import copy_reports, write_small_model_card
from train.sft import StageConfig, select_rows, train_stage
from train.stages import point_adapter_at
from train.tower import tower_whisper

BASE = StageConfig(name="base", trainable="projector_and_lora", samplings=("positive",), epochs=0.6, batch_size=8,
                   learning_rate=1e-3, warmup_steps=20, turns_per_chat=6, caption_share=0.2)


def train_lookup(model, processor, corpus_dir: Path, out_dir: Path, spec: SmallSpec, config: LookupFit = LookupFit(), log=print) -> list[dict]:
    """The lookup stage, in place: ``train.lookup.fit_lookup`` trains a copy of the model's language-model layers and
    final norm over the sounds' written names at the served audio positions (and, with ``config.heard_share``, over the
    model's own audio tokens: after LISTEN), resumable from ``out_dir``; the layers are put back in the precision they
    are committed in (float16), and gate 1 (and, over its own tokens, gate 2) is measured on them, so what is evaluated
    is what ships. Returns the learning curve."""

    ontology = load_ontology(corpus_dir / "ontology.json")
    lm = checkpoint_lm(unwrap(model))
    heard = heard_tokens(model, corpus_dir, spec, views=config.heard_views, seed=config.seed) if config.heard_share else None
    history = fit_lookup(lm, processor.tokenizer, corpus_dir, ontology.names, phrase_word_ids(ontology, processor.tokenizer),
                         spec.audio_tokens, float(spec.window_s), out_dir, config, log, heard=heard)
    target = unwrap(model).model.language_model
    with torch.no_grad():
        for name, param in target.named_parameters():
            if name.startswith(LM_TRAINED_PARTS):
                param.copy_(lm.model.get_parameter(name).half().float())
    gate = stage_gate(model, processor, corpus_dir, "oracle")
    if heard is not None:  # after LISTEN the stage answers to gate 2, and gate 1 is kept beside it
        gate = {**stage_gate(model, processor, corpus_dir, "served"), "oracle": gate}
    (out_dir / "lookup.json").write_text(json.dumps({"config": asdict(config), "history": history, "gate": gate}, indent=2))
    return history


def fit_projector_to_names(model, processor, corpus_dir: Path, spec: SmallSpec, tower: Path | None = None, ridge: float = 100.0,
                           positions: int | None = None) -> float:
    """LISTEN's step after a lookup: the projector, in closed form, so the tower speaks the lookup's language.

    The lookup taught the language model presence over the sounds' written names (the mean word embedding of
    the classes active at each position). A ridge regression from the tower's outputs onto those name tokens
    sets the projector: on validation it reads 0.72 ROC-AUC through the lookup on the served 250 tokens,
    where a projector learnt by gradient from a random start stays at 0.61-0.65 (the binding diagnostic),
    and gradient steps from the fit move it back down (0.64 after 150 steps at lr 1e-4). Only the projector
    changes: the language model stays frozen, as LISTEN wants. Returns the fit's R² on the training split.
    """

    ontology = load_ontology(corpus_dir / "ontology.json")
    hidden, rows, _, _ = encoded_data(corpus_dir, "train", BASE, spec, progress=False, tower=tower)
    active = frame_targets(read_timelines(corpus_dir, "train"), rows, ontology.names, hidden.shape[1], float(spec.window_s))
    embed = model.get_input_embeddings().weight.detach().float()
    weight, r2 = ridge_to_names(hidden, active, embed, phrase_word_ids(ontology, processor.tokenizer), ridge, positions)
    linear = unwrap(model).model.multi_modal_projector.linear
    with torch.no_grad():
        linear.weight.copy_(weight[:-1].T.to(linear.weight.dtype))
        linear.bias.copy_(weight[-1].to(linear.bias.dtype))
    return r2


def ridge_to_names(hidden: np.ndarray, active: np.ndarray, embed: torch.Tensor, word_ids: list[list[int]], ridge: float = 100.0,
                   positions: int | None = None, chunk: int = 500) -> tuple[torch.Tensor, float]:
    """Least squares (ridge ``ridge``) from audio features ``[N, P, d]`` to the name tokens of ``active`` ``[N, P, C]``,
    both pooled to ``positions``: ``(weight [d + 1, D] with the bias as its last row, R²)``. Accumulated in chunks,
    so the 6,000-scene split never sits in memory in float64."""
    d, width, names = hidden.shape[-1] + 1, embed.shape[1], name_embeddings(embed, word_ids)  # once, not per chunk
    xtx, xty = torch.zeros(d, d, dtype=torch.float64), torch.zeros(d, width, dtype=torch.float64)
    y_sum, yy, n = torch.zeros(width, dtype=torch.float64), 0.0, 0
    for start in range(0, len(hidden), chunk):
        x, a = pool_positions(torch.from_numpy(np.asarray(hidden[start:start + chunk], dtype=np.float32)),
                              torch.from_numpy(np.asarray(active[start:start + chunk], dtype=np.float32)), positions)
        y = mix_names(a, names).reshape(-1, width).double()
        x = torch.cat([x.reshape(-1, d - 1).double(), torch.ones(len(y), 1, dtype=torch.float64)], 1)
        xtx, xty = xtx + x.T @ x, xty + x.T @ y
        y_sum, yy, n = y_sum + y.sum(0), yy + y.square().sum().item(), n + len(y)
    weight = torch.linalg.solve(xtx + ridge * torch.eye(d, dtype=torch.float64), xty)
    sse = yy - 2 * (weight * xty).sum().item() + (weight * (xtx @ weight)).sum().item()
    return weight.float(), 1 - sse / max(yy - y_sum.square().sum().item() / n, 1e-12)


def encoded_data(corpus_dir: Path, split: str, config: StageConfig, spec: SmallSpec, progress: bool = True, tower: Path | None = None) -> tuple:
    """``(tower outputs, scene → row, frames, rows by scene)`` for a stage, from the feature cache (of ``tower``, a
    distilled tower's Whisper directory, when the model is built on one)."""

    enc = encoder_features(corpus_dir, split, str(tower or spec.encoder), spec.window_s, progress=progress)
    frames = np.full(len(enc.rows), spec.window_s * 100, dtype=np.int32)
    return enc.last, enc.rows, frames, select_rows(read_qa_rows(corpus_dir, split), config)


def tower_of(ckpt: Path) -> Path | None:
    """The Whisper directory of a checkpoint's distilled tower (None: the part as fetched), whose feature cache the
    supervised stages read."""
    return tower_whisper(ckpt)[0] if read_spec(ckpt).tower_layers else None


def train_base(corpus_dir: Path, out_dir: Path, config: StageConfig = BASE, tower: Path | None = None, progress: bool = True) -> list[dict]:
    """Projector + LoRA on positive-only questions, saved in committed form with the LoRA beside it (and the distilled
    tower's layers, ``tower``: a distillation run or a checkpoint that commits them). Returns the stage's history."""
    from peft import get_peft_model

    spec, whisper = SmallSpec(), None
    if tower is not None:
        whisper, layers = tower_whisper(tower, spec.encoder)
        spec = replace(spec, tower_layers=layers)
    processor, model = build_untrained(spec, seed=config.seed, tower=str(whisper) if whisper else None)
    peft_model = get_peft_model(model, lora_config(model, r=16, alpha=32, dropout=0.0))
    train = encoded_data(corpus_dir, "train", config, spec, progress, whisper)
    val = encoded_data(corpus_dir, "validation", config, spec, progress, whisper)
    history = train_stage(EncodedForward(peft_model), processor.tokenizer, train, val, config, out_dir, progress=progress,
                          collate_fn=collate_encoded)
    peft_model.save_pretrained(out_dir / BASE_LORA_DIR)
    save_trained(peft_model.merge_and_unload(), processor, out_dir, spec)
    return history


def load_small(ckpt: Path):
    """``(processor, model)`` of a checkpoint in committed form, rebuilt from the parts, to train further."""
    processor, model = build_untrained(read_spec(ckpt))
    load_trained(model, processor.tokenizer, ckpt)
    return processor, model.eval()


def lookup_stage(source: Path, corpus_dir: Path, out_dir: Path, config: LookupFit = LookupFit()) -> list[dict]:
    """``train lookup``: the source's language-model layers learn the lookup; saved with those layers committed."""
    spec = replace(read_spec(source), trained_layers=True)
    if config.heard_share and not spec.tower_layers:
        raise SystemExit(f"{source}: --heard learns on the tokens of the audio path LISTEN trains; run `train listen --projector lookup` first")
    processor, model = load_small(source)
    history = train_lookup(model, processor, corpus_dir, out_dir, spec, config)
    save_trained(model, processor, out_dir, spec)  # the layers now hold the base LoRA, merged, and the lookup
    return history


@dataclass(frozen=True)
class NamesFit:
    """LISTEN in closed form (``train listen --projector names``)."""

    ridge: float = field(default=100.0, metadata={"help": "Ridge penalty of the least-squares fit of the projector onto the name tokens."})
    positions: int | None = field(default=None, metadata={"help": "Pool tower outputs and names to this many positions for the fit; None: the served 250."})


def listen_names_stage(source: Path, corpus_dir: Path, out_dir: Path, config: NamesFit = NamesFit()) -> dict:
    """``train listen --projector names``: the source's projector fitted onto its lookup's names, all else as it was."""
    processor, model, spec = _after_lookup(source, "names")
    r2 = fit_projector_to_names(model, processor, corpus_dir, spec, tower_of(source), config.ridge, config.positions)
    save_trained(model, processor, out_dir, spec)
    (out_dir / "listen.json").write_text(json.dumps({"projector": "ridge onto the lookup's name tokens", "r2": round(r2, 4)}))
    return {"r2": round(r2, 4)}


def listen_lookup_stage(source: Path, corpus_dir: Path, out_dir: Path, config: AudioPathFit = AudioPathFit(), names: NamesFit = NamesFit()) -> dict:
    """``train listen --projector lookup`` (gate 2): the projector fitted onto the names, then the tower's top layers,
    its norm and the projector trained through the frozen lookup (``train.audio_path``), resumable from ``out_dir``;
    committed in float16 and measured as served (validation served ROC-AUC against ``SERVED_GATE``)."""
    processor, model, spec = _after_lookup(source, "lookup")
    r2 = None
    if not (out_dir / "checkpoint.pt").exists():  # a resumed fit carries its own projector
        r2 = fit_projector_to_names(model, processor, corpus_dir, spec, tower_of(source), names.ridge, names.positions)
    layers = len(unwrap(model).model.audio_tower.layers)
    spec = replace(spec, tower_layers=spec.tower_layers or (layers - 2, layers - 1))  # what trains is committed
    history = fit_audio_path(model, checkpoint_lm(unwrap(model)).eval(), processor.tokenizer, corpus_dir, spec, out_dir, config)
    with torch.no_grad():  # in the precision they are committed in, so what is measured is what ships
        for prefix in spec.tower_prefixes + ("model.multi_modal_projector.",):
            for name, param in unwrap(model).named_parameters():
                if name.startswith(prefix):
                    param.copy_(param.half().float())
    gate = stage_gate(model, processor, corpus_dir, "served")
    save_trained(model, processor, out_dir, spec)
    record = {"projector": "names, then trained through the lookup with the tower's top layers", "names_r2": r2,
              "config": asdict(config), "history": history, "gate": gate}
    (out_dir / "listen.json").write_text(json.dumps(record, indent=2))
    return {"names_r2": r2, "steps": history[-1]["step"], "gate": gate}


def _after_lookup(source: Path, projector: str):
    spec = read_spec(source)
    if not spec.trained_layers:
        raise SystemExit(f"{source}: --projector {projector} fits the audio path to what a lookup stage taught; run `train lookup` first")
    processor, model = load_small(source)
    return processor, model, spec


def ship(trained_dir: Path, adapter_dir: Path, reports: dict[str, Path], record: dict, ship_dir: Path) -> None:
    """Only what training made: trained tensors (the base's, or the lookup's with its layers), base LoRA (when
    the layers are not committed), aligned adapter, processor, curves (``reports``: file name → source), card."""

    ship_dir.mkdir(parents=True, exist_ok=True)
    for name in (PARTS_FILE, TRAINED_FILE, *PROCESSOR_FILES):
        if (trained_dir / name).exists():
            shutil.copy2(trained_dir / name, ship_dir / name)
    for sub, src in ((BASE_LORA_DIR, trained_dir / BASE_LORA_DIR), ("adapter", adapter_dir)):
        shutil.rmtree(ship_dir / sub, ignore_errors=True)
        if not src.exists():
            continue
        shutil.copytree(src, ship_dir / sub, ignore=shutil.ignore_patterns("*.png", "*.jsonl", "checkpoint-*", "README.md", "*.json.bak",
                                                                          "tokenizer*", "processor_config.json", "chat_template.jinja"))
    point_adapter_at(ship_dir / "adapter", ship_dir.name)
    if (ship_dir / BASE_LORA_DIR).exists():
        point_adapter_at(ship_dir / BASE_LORA_DIR, ship_dir.name)
    copy_reports(reports, record, ship_dir / "training")
    write_small_model_card(ship_dir, record)
