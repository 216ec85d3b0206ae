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
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from train.dpo_collator import SAMPLE_RATE, AudioPreferenceCollator, load_audio_file
from models.families import family_of
from train.lora import lora_config
from train.options import AudioDPOConfig, resume_point, trainer_arguments

LOG_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")
_EXTRA_LOG_KEYS = ("logps/chosen", "logps/rejected", "grad_norm", "learning_rate", "epoch")
REQUIRED_COLUMNS = ("prompt", "chosen", "rejected", "audio")


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

        def __init__(self, out_dir: Path, resume: bool = False):
            self.log_path = out_dir / "dpo_log.jsonl"
            self.png_path = out_dir / "dpo_curve.png"
            self.rows: list[dict] = []
            if resume and self.log_path.exists():  # a resumed run continues its curve
                self.rows = [json.loads(line) for line in self.log_path.read_text().splitlines() if line.strip()]
            else:
                self.log_path.write_text("")

        def on_train_begin(self, args, state, control, **kwargs):
            self.rows = [r for r in self.rows if r["step"] <= state.global_step]  # steps after the checkpoint are redone
            self.log_path.write_text("".join(json.dumps(r) + "\n" for r in self.rows))

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
    """TRL's ``DPOConfig`` for a run: the shared trainer settings (:func:`train.options.trainer_arguments`) and DPO's."""
    from trl import DPOConfig

    return DPOConfig(
        **trainer_arguments(cfg, out_dir),
        beta=cfg.beta,
        max_length=None,  # the collator never cuts prompts (audio tokens); see max_completion_tokens
        disable_dropout=False,
        precompute_ref_log_probs=False,
    )


def make_trainer(
    model,
    processor,
    dataset,
    out_dir: str | Path,
    config: AudioDPOConfig | None = None,
    *,
    load_audio: Callable[[str], np.ndarray] | None = None,
    resume: bool = False,
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
    trainer = AudioDPOTrainer(
        model=model,
        args=args,
        data_collator=collator,
        train_dataset=dataset,
        processing_class=processor,
        peft_config=lora_config(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.modules_to_save),
        callbacks=[DPOLogCallback(out_dir, resume)],
    )
    if not cfg.train_saved_modules:  # the copies ride along in the adapter; LoRA alone learns (the optimizer is built in train())
        for name, param in trainer.model.named_parameters():
            if "modules_to_save" in name:
                param.requires_grad = False
    return trainer


def train_dpo(
    model,
    processor,
    dataset: "datasets.Dataset",  # noqa: F821
    out_dir: str | Path,
    config: AudioDPOConfig | None = None,
    *,
    load_audio: Callable[[str], np.ndarray] | None = None,
    resume: bool | str = False,
    prepare: Callable[[Any], Any] | None = None,
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
    ``gradient_checkpointing`` default to on with CUDA, off on CPU. ``resume`` (True: the newest checkpoint under
    ``out_dir``; or a checkpoint directory) continues a run that saved checkpoints (``save_steps``); ``prepare`` wraps
    the trainer before it runs (Ray Train's ``prepare_trainer``).
    """
    cfg = replace(config or AudioDPOConfig(), **settings)
    trainer = make_trainer(model, processor, dataset, out_dir, cfg, load_audio=load_audio, resume=bool(resume))
    if prepare is not None:
        trainer = prepare(trainer)
    result = trainer.train(resume_from_checkpoint=resume_point(resume, out_dir))
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
        "base_model": base.config.name_or_path or None,
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
