"""DPO stage: LoRA on the language model of an audio-language model, with audio on *both* sides.

TRL's ``DPOTrainer`` (1.16) only knows text and images. Its text path tokenizes prompts to ids and its
preference collator keeps ids and masks, so audio would be dropped before the model ever saw it. This
module keeps TRL's loss, reference handling, metrics and training loop, and replaces the two pieces that
touch data:

* :class:`AudioDPOTrainer` overrides ``_prepare_dataset`` to leave the rows untouched (TRL would tokenize
  them text-only); ``remove_unused_columns=False`` keeps the ``audio`` columns on the way to the collator.
* :class:`~train.dpo_collator.AudioPreferenceCollator` builds each batch with per-side audio: the chosen
  rows hear ``audio``, the rejected rows ``rejected_audio`` (see :mod:`train.dpo_collator`, which also
  lists the dataset columns).

TRL computes log-probs with a fused LM head patched onto the model: ``model.model(**batch)`` (the
backbone, audio tower included, so ``input_features`` reach the encoder) then ``lm_head.weight``. With
PEFT the reference model is the same network with the adapter disabled (``use_adapter(model, None)``),
so no copy is held in memory.

LoRA is scoped to the language model's linear layers (:mod:`train.lora`). A run's settings are one
:class:`AudioDPOConfig`, written with the adapter (``earwitness_dpo.json``, key ``dpo_config``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from train.dpo_collator import SAMPLE_RATE, AudioPreferenceCollator, load_audio_file
from models.families import family_of
from train.lora import lora_config

LOG_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")
_EXTRA_LOG_KEYS = ("logps/chosen", "logps/rejected", "grad_norm", "learning_rate", "epoch")
REQUIRED_COLUMNS = ("prompt", "chosen", "rejected", "audio")


# --------------------------------------------------------------------------------------------- config


@dataclass
class AudioDPOConfig:
    """The settings of one DPO run (:func:`make_trainer`, :func:`train_dpo`), each field with its help as in
    TRL's configs; ``asdict`` of it is written next to the adapter (``earwitness_dpo.json``, ``dpo_config``)."""

    lora_r: int = field(default=16, metadata={"help": "LoRA rank on the language model's linear layers."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling α (the update is scaled by α / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on LoRA's input; the base network's dropout is always off."})
    modules_to_save: list[str] | None = field(default=None, metadata={
        "help": "Modules trained as full copies (e.g. ['lm_head']): a PEFT-only extra that vLLM does not load."})
    beta: float = field(default=0.1, metadata={"help": "DPO β: how far the policy may move from the reference."})
    learning_rate: float = field(default=5e-5, metadata={"help": "Peak learning rate of the adapter."})
    epochs: float = field(default=1.0, metadata={"help": "Passes over the pairs (ignored when max_steps > 0)."})
    batch_size: int = field(default=8, metadata={
        "help": "Pairs per device step; each runs 2 × batch_size sequences through the policy and the reference."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Steps whose gradients are summed before an update."})
    max_steps: int = field(default=-1, metadata={"help": "Stop after this many updates; -1: run the epochs."})
    seed: int = field(default=0, metadata={"help": "Seed of the model's initialisation and of the data order."})
    logging_steps: int = field(default=10, metadata={"help": "Log (dpo_log.jsonl, dpo_curve.png) every this many steps; the last is always logged."})
    audio_root: str | Path | None = field(default=None, metadata={"help": "Directory that relative audio paths are joined to."})
    max_completion_tokens: int | None = field(default=None, metadata={
        "help": "Cut answers to this many tokens; prompts are never cut (their audio tokens must match the features)."})
    gradient_checkpointing: bool | None = field(default=None, metadata={"help": "Recompute activations in the backward pass; None: on with CUDA."})
    bf16: bool | None = field(default=None, metadata={"help": "Train in bfloat16; None: on with CUDA where supported."})


# --------------------------------------------------------------------------------------------- trainer


def _trainer_classes():
    """Built lazily so importing this module does not import TRL (the serving image has no TRL)."""
    from transformers import TrainerCallback
    from trl import DPOTrainer

    class AudioDPOTrainer(DPOTrainer):
        """``DPOTrainer`` whose rows reach the collator untouched (audio is turned into features per batch)."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            columns = set(dataset.column_names or next(iter(dataset)).keys())
            missing = [c for c in REQUIRED_COLUMNS if c not in columns]
            if missing:
                raise ValueError(f"{dataset_name} dataset lacks column(s) {missing}; it has {sorted(columns)}")
            return dataset

        def _set_signature_columns_if_needed(self):
            if self._signature_columns is None:
                self._signature_columns = [*REQUIRED_COLUMNS, "rejected_audio"]

    class DPOLogCallback(TrainerCallback):
        """Appends each logged step to ``dpo_log.jsonl`` and redraws ``dpo_curve.png``."""

        def __init__(self, out_dir: Path):
            self.log_path = out_dir / "dpo_log.jsonl"
            self.png_path = out_dir / "dpo_curve.png"
            self.rows: list[dict] = []
            self.log_path.write_text("")

        def on_step_end(self, args, state, control, **kwargs):
            if state.max_steps and state.global_step >= state.max_steps:
                control.should_log = True  # always record the last step
            return control

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "loss" not in logs or not state.is_world_process_zero:
                return
            row = {"step": state.global_step}
            row.update({k: float(logs[k]) for k in (*LOG_KEYS, *_EXTRA_LOG_KEYS) if k in logs})
            if self.rows and self.rows[-1]["step"] == row["step"]:
                return
            self.rows.append(row)
            with self.log_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            write_curve(self.rows, self.png_path)

    return AudioDPOTrainer, DPOLogCallback


def write_curve(rows: Sequence[Mapping[str, float]], path: str | Path) -> Path:
    """Loss and reward margin against step (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, (ax_loss, ax_reward) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax_loss.plot(steps, [r.get("loss", math.nan) for r in rows], marker="o")
    ax_loss.set(xlabel="step", ylabel="DPO loss", title="loss")
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        ax_reward.plot(steps, [r.get(key, math.nan) for r in rows], marker=".", label=key.split("/")[1])
    ax_reward.set(xlabel="step", ylabel="β·log-ratio", title="rewards")
    ax_reward.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return Path(path)


def _dpo_arguments(cfg: AudioDPOConfig, out_dir: Path):
    """TRL's ``DPOConfig`` for a run: no checkpoints, no reports, every column kept for the collator, and
    ``bf16`` / ``gradient_checkpointing`` on with CUDA unless the config says otherwise."""
    from trl import DPOConfig

    cuda = torch.cuda.is_available()
    return DPOConfig(
        output_dir=str(out_dir),
        beta=cfg.beta,
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        gradient_checkpointing=cuda if cfg.gradient_checkpointing is None else cfg.gradient_checkpointing,
        seed=cfg.seed,
        data_seed=cfg.seed,
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        report_to=[],
        save_strategy="no",
        remove_unused_columns=False,
        use_cpu=not cuda,
        bf16=(cuda and torch.cuda.is_bf16_supported()) if cfg.bf16 is None else cfg.bf16,
        fp16=False,
        max_length=None,  # the collator never cuts prompts (audio tokens); see max_completion_tokens
        disable_dropout=False,
        precompute_ref_log_probs=False,
        dataloader_num_workers=0,
    )


def make_trainer(
    model,
    processor,
    dataset,
    out_dir: str | Path,
    config: AudioDPOConfig | None = None,
    *,
    load_audio: Callable[[str], np.ndarray] | None = None,
    **settings: Any,
):
    """The configured :class:`AudioDPOTrainer` (model wrapped with LoRA), not yet trained. See :func:`train_dpo`.

    ``config`` (default :class:`AudioDPOConfig`) with any ``settings`` (its field names: ``lora_r=4``, ``beta=0.2``
    …) replacing its values; an unknown name raises ``TypeError``.
    """
    from trl.trainer.utils import disable_dropout_in_model

    cfg = replace(config or AudioDPOConfig(), **settings)
    family_of(model)  # raises on anything else
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    # TRL's default (disable_dropout=True) would also zero LoRA's dropout. Instead the base network is made
    # deterministic here (so the adapter-disabled reference is exact) and LoRA dropout stays as asked.
    disable_dropout_in_model(model)
    processor.tokenizer.padding_side = "left"

    args = _dpo_arguments(cfg, out_dir)
    collator = AudioPreferenceCollator(
        processor=processor,
        load_audio=load_audio or load_audio_file,
        audio_root=Path(cfg.audio_root) if cfg.audio_root is not None else None,
        sample_rate=int(getattr(processor.feature_extractor, "sampling_rate", SAMPLE_RATE)),
        max_completion_tokens=cfg.max_completion_tokens,
        feature_dtype=next(model.parameters()).dtype,  # a bf16-loaded encoder needs bf16 features; autocast does the rest
    )
    AudioDPOTrainer, DPOLogCallback = _trainer_classes()
    return AudioDPOTrainer(
        model=model,
        args=args,
        data_collator=collator,
        train_dataset=dataset,
        processing_class=processor,
        peft_config=lora_config(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.modules_to_save),
        callbacks=[DPOLogCallback(out_dir)],
    )


def train_dpo(
    model,
    processor,
    dataset: "datasets.Dataset",  # noqa: F821
    out_dir: str | Path,
    config: AudioDPOConfig | None = None,
    *,
    load_audio: Callable[[str], np.ndarray] | None = None,
    **settings: Any,
) -> Path:
    """DPO with LoRA scoped to the language model; returns the exported adapter directory.

    The run's settings are ``config`` (default :class:`AudioDPOConfig`), with any ``settings`` (its field names)
    replacing its values. Writes, under ``out_dir``:

    * ``adapter/`` — ``adapter_config.json`` + ``adapter_model.safetensors`` (``PeftModel.from_pretrained``;
      plain LoRA on the decoder's linears, the form vLLM's LoRA loader takes — ``modules_to_save`` is a
      PEFT-only extra that vLLM ignores), ``earwitness_dpo.json`` (the settings, the whole config under
      ``dpo_config``) and a copy of the processor, so :func:`~models.loading.export_merged` can ship a complete
      checkpoint.
    * ``dpo_log.jsonl`` — one line per logged step: step, loss, rewards/chosen, rewards/rejected,
      rewards/accuracies, rewards/margins (plus logps, grad_norm, learning_rate). The last step is always logged.
    * ``dpo_curve.png`` — loss and rewards, redrawn at each log.

    ``model`` (a ``Qwen2AudioForConditionalGeneration`` or ``Qwen2_5OmniThinkerForConditionalGeneration``) is
    modified in place: its dropout is disabled, and it carries the trained LoRA layers afterwards (so it *is*
    the trained model for immediate evaluation); reload the base from disk for a clean copy. ``batch_size``
    counts pairs (each step runs ``2 × batch_size`` sequences through the policy and again, without the
    adapter and without gradients, as the reference). ``load_audio(path)`` defaults to soundfile + soxr
    (mono, 16 kHz); relative paths are joined to ``audio_root`` first. ``bf16`` and
    ``gradient_checkpointing`` default to on with CUDA, off on CPU.
    """
    cfg = replace(config or AudioDPOConfig(), **settings)
    trainer = make_trainer(model, processor, dataset, out_dir, cfg, load_audio=load_audio)
    result = trainer.train()
    adapter_dir = Path(out_dir) / "adapter"
    export_adapter(trainer, adapter_dir, extra={
        "beta": cfg.beta, "learning_rate": cfg.learning_rate, "epochs": cfg.epochs, "batch_size": cfg.batch_size,
        "max_steps": cfg.max_steps, "global_step": trainer.state.global_step, "seed": cfg.seed,
        "lora_r": cfg.lora_r, "lora_alpha": cfg.lora_alpha, "lora_dropout": cfg.lora_dropout,
        "modules_to_save": cfg.modules_to_save, "train_loss": float(result.training_loss),
        "pairs": len(dataset) if hasattr(dataset, "__len__") else None, "kinds": _kind_counts(dataset),
        "dpo_config": asdict(cfg),
    })
    trainer.model.eval()
    return adapter_dir


def _kind_counts(dataset) -> dict[str, int]:
    if "kind" not in (dataset.column_names or []) or not hasattr(dataset, "__len__"):
        return {}
    kinds, counts = dataset["kind"], {}
    for kind in kinds:
        counts[str(kind)] = counts.get(str(kind), 0) + 1
    return counts


def export_adapter(trainer, adapter_dir: str | Path, extra: Mapping[str, Any] | None = None) -> Path:
    """Save the trained adapter (+ processor and a settings note) of a trainer from :func:`make_trainer`."""
    adapter_dir = Path(adapter_dir)
    trainer.accelerator.wait_for_everyone()
    if not trainer.accelerator.is_main_process:
        return adapter_dir
    model = trainer.accelerator.unwrap_model(trainer.model)
    model.save_pretrained(str(adapter_dir))
    trainer.processing_class.save_pretrained(str(adapter_dir))
    base = model.get_base_model()
    note = {
        "family": family_of(base).name,
        "base_model": getattr(base.config, "_name_or_path", "") or None,
        "target_modules": model.peft_config["default"].target_modules,
        **(extra or {}),
    }
    (adapter_dir / "earwitness_dpo.json").write_text(json.dumps(note, indent=2, default=str) + "\n")
    return adapter_dir


# --------------------------------------------------------------------------------------------- analysis


@torch.no_grad()
def completion_logps(model, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probabilities of the completions of a collated batch: ``(chosen[B], rejected[B])``.

    Uses the plain forward (full logits), so it works on any model, trained or not, PEFT or not.
    """
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in batch.items() if k != "completion_mask"}
    logits = model(**inputs, use_cache=False).logits[:, :-1].float()
    labels = batch["input_ids"][:, 1:].to(device)
    mask = batch["completion_mask"][:, 1:].to(device).bool()
    per_token = torch.gather(logits.log_softmax(-1), 2, labels.unsqueeze(-1)).squeeze(-1)
    logps = (per_token * mask).sum(-1)
    return tuple(logps.chunk(2, dim=0))
