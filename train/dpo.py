"""DPO stage: LoRA on the language model of an audio-language model, with audio on *both* sides.

TRL's ``DPOTrainer`` (1.16) only knows text and images. Its text path tokenizes prompts to ids and its
preference collator keeps ids and masks, so audio would be dropped before the model ever saw it. This
module keeps TRL's loss, reference handling, metrics and training loop, and replaces the two pieces that
touch data:

* :class:`AudioDPOTrainer` overrides ``_prepare_dataset`` to leave the rows untouched (TRL would tokenize
  them text-only); ``remove_unused_columns=False`` keeps the ``audio`` columns on the way to the collator.
* :class:`AudioPreferenceCollator` builds the batch the way TRL's vision collator does for images, but
  for audio and *per side*: rows ``0..B-1`` are prompt+chosen conditioned on ``audio``, rows ``B..2B-1``
  are prompt+rejected conditioned on ``rejected_audio`` (or ``audio`` when it is None). Each row's prompt
  goes through the processor with its own clip, so the number of ``<|AUDIO|>`` tokens always matches what
  the processor expands for that clip (it can differ between the sides), and ``input_features`` /
  ``feature_attention_mask`` hold ``2B`` clips in row order. ACPO input-contrastive pairs (same prompt,
  same answer, swapped audio) therefore differ only in the features the rejected side hears.

TRL computes log-probs with a fused LM head patched onto the model: ``model.model(**batch)`` (the
backbone, audio tower included, so ``input_features`` reach the encoder) then ``lm_head.weight``. With
PEFT the reference model is the same network with the adapter disabled (``use_adapter(model, None)``),
so no copy is held in memory.

LoRA is scoped by a regex to the language model's linear layers. Bare names (``q_proj`` …) would also
hit the Whisper-style audio encoder (``q_proj/k_proj/v_proj``) and, in Qwen2.5-Omni, the vision tower's
MLP (``gate_proj/up_proj/down_proj``).

Dataset columns: ``prompt`` (question text, or a list of chat messages), ``chosen``, ``rejected``
(answer texts), ``audio`` (path, float array at 16 kHz, or a ``datasets.Audio`` dict), ``rejected_audio``
(same, or None) and optionally ``kind`` and anything else (ignored). Relative paths are resolved against
``audio_root`` (``train.data.prefs`` writes paths relative to the corpus directory).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

SAMPLE_RATE = 16_000
TURN_END = "<|im_end|>"  # ChatML: an assistant turn ends here, and generation stops on it
LOG_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")
_EXTRA_LOG_KEYS = ("logps/chosen", "logps/rejected", "grad_norm", "learning_rate", "epoch")
LM_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FAMILIES = {"qwen2_audio": "qwen2-audio", "qwen2_5_omni_thinker": "qwen2.5-omni-thinker"}
REQUIRED_COLUMNS = ("prompt", "chosen", "rejected", "audio")


# --------------------------------------------------------------------------------------------- model


def model_family(model) -> str:
    """``"qwen2-audio"`` or ``"qwen2.5-omni-thinker"``, from ``config.model_type`` (PEFT wrappers unwrapped)."""
    model = _unwrap(model)
    model_type = getattr(model.config, "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(f"unsupported model type {model_type!r} ({type(model).__name__}); known: {', '.join(FAMILIES)}")
    return FAMILIES[model_type]


def _unwrap(model):
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) and hasattr(model, "peft_config") else model


def _language_model_prefix(model) -> str:
    """The module path of the text decoder, e.g. ``model.language_model`` (both families in transformers 5)."""
    model = _unwrap(model)
    model_type = getattr(model.config, "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(f"unsupported model type {model_type!r}; known: {', '.join(FAMILIES)}")
    target = getattr(getattr(model, "model", None), "language_model", None)
    if target is None:
        target = model.get_decoder()
    for name, module in model.named_modules():
        if module is target:
            return name
    raise ValueError(f"cannot locate the language model inside {type(model).__name__}")


def language_model_lora_pattern(model) -> str:
    """A PEFT ``target_modules`` regex (full match) for the decoder's attention and MLP linears only.

    For both Qwen2-Audio and the Qwen2.5-Omni thinker under transformers 5 this is
    ``model\\.language_model\\.layers\\.\\d+\\.(?:self_attn\\.(?:q_proj|…|o_proj)|mlp\\.(?:gate_proj|…))``;
    the audio tower (``model.audio_tower``), the projector and Omni's vision tower (``model.visual``) stay
    untouched. Raises if the pattern matches nothing.
    """
    prefix = re.escape(_language_model_prefix(model))
    pattern = rf"{prefix}\.layers\.\d+\.(?:self_attn\.(?:q_proj|k_proj|v_proj|o_proj)|mlp\.(?:gate_proj|up_proj|down_proj))"
    names = [n for n, m in _unwrap(model).named_modules() if isinstance(m, torch.nn.Linear) and re.fullmatch(pattern, n)]
    if not names:
        raise ValueError(f"LoRA pattern {pattern!r} matches no linear layer of {type(_unwrap(model)).__name__}")
    return pattern


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


# --------------------------------------------------------------------------------------------- audio


def load_audio_file(path, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Decode a file or file-like object (anything libsndfile reads: wav, flac, ogg …) to float32 mono at ``sample_rate``."""
    import soundfile as sf
    import soxr

    source = str(path) if isinstance(path, (str, os.PathLike)) else path
    samples, sr = sf.read(source, dtype="float32", always_2d=True)
    mono = samples.mean(axis=1)
    if sr != sample_rate:
        mono = soxr.resample(mono, sr, sample_rate, quality="HQ")
    return np.ascontiguousarray(mono, dtype=np.float32)


def _resolve(path: str, root: Path | None) -> str:
    return str(root / path) if root is not None and not os.path.isabs(path) else path


# --------------------------------------------------------------------------------------------- collator


def prompt_text(processor, prompt: str | Sequence[Mapping[str, Any]]) -> str:
    """The serve-time prompt (see ``serving/backends/hf.py``): one user turn, audio first, then the question."""
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": prompt}]}]
    else:
        messages = list(prompt)
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


@dataclass
class AudioPreferenceCollator:
    """Preference batches with per-side audio, in the layout ``DPOTrainer._compute_loss`` expects.

    Returns ``input_ids``, ``attention_mask``, ``completion_mask`` (``2B`` rows, right-padded, chosen rows
    first) plus the processor's audio tensors for the same ``2B`` rows (``input_features``,
    ``feature_attention_mask``). Every key except ``completion_mask`` is passed to the model's forward.

    ``max_completion_tokens`` cuts long answers; prompts are never cut (cutting ``<|AUDIO|>`` tokens
    would desynchronise them from the features).
    """

    processor: Any
    load_audio: Callable[[str], np.ndarray] = load_audio_file
    audio_root: Path | None = None
    sample_rate: int = SAMPLE_RATE
    max_completion_tokens: int | None = None
    feature_dtype: torch.dtype | None = None
    _end: str = field(init=False, default="")

    def __post_init__(self):
        tokenizer = self.processor.tokenizer
        self._end = TURN_END if TURN_END in tokenizer.get_vocab() else tokenizer.eos_token
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer needs a pad token")

    def audio(self, value) -> np.ndarray:
        if isinstance(value, (str, os.PathLike)):
            return np.asarray(self.load_audio(_resolve(str(value), self.audio_root)), dtype=np.float32)
        if isinstance(value, Mapping):  # a datasets.Audio cell: decoded {"array", "sampling_rate"} or raw {"bytes", "path"}
            if value.get("array") is None:
                if value.get("bytes"):
                    import io

                    return load_audio_file(io.BytesIO(value["bytes"]), self.sample_rate)
                return self.audio(value["path"])
            samples, sr = np.asarray(value["array"], dtype=np.float32), int(value.get("sampling_rate") or self.sample_rate)
            if sr != self.sample_rate:
                import soxr

                samples = soxr.resample(samples, sr, self.sample_rate, quality="HQ").astype(np.float32)
            return samples
        samples = np.asarray(value, dtype=np.float32)
        if samples.ndim != 1:
            raise ValueError(f"audio arrays must be mono 1-D at {self.sample_rate} Hz, got shape {samples.shape}")
        return samples

    def __call__(self, examples: list[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        tokenizer = self.processor.tokenizer
        prompts = [prompt_text(self.processor, ex["prompt"]) for ex in examples]
        chosen_audio = [self.audio(ex["audio"]) for ex in examples]
        rejected_audio = [
            self.audio(ex["rejected_audio"]) if ex.get("rejected_audio") is not None else clip
            for ex, clip in zip(examples, chosen_audio)
        ]
        # One processor call for all 2B rows: it expands each <|AUDIO|> to its own clip's token count.
        encoded = self.processor(
            text=prompts + prompts,
            audio=chosen_audio + rejected_audio,
            sampling_rate=self.sample_rate,
            return_tensors="pt",
            padding=True,
        )
        completions = [ex["chosen"] for ex in examples] + [ex["rejected"] for ex in examples]
        completion_ids = tokenizer([c + self._end for c in completions], add_special_tokens=False)["input_ids"]

        rows, masks = [], []
        for ids, attention, completion in zip(encoded["input_ids"], encoded["attention_mask"], completion_ids):
            prompt_ids = ids[attention.bool()].tolist()  # works for either padding side
            if self.max_completion_tokens is not None:
                completion = completion[: self.max_completion_tokens]
            rows.append(prompt_ids + list(completion))
            masks.append([0] * len(prompt_ids) + [1] * len(completion))
        width = max(len(r) for r in rows)
        pad = tokenizer.pad_token_id
        batch = {
            "input_ids": torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=torch.long),
            "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], dtype=torch.long),
            "completion_mask": torch.tensor([m + [0] * (width - len(m)) for m in masks], dtype=torch.long),
        }
        skip = {"input_ids", "attention_mask", *getattr(self.processor, "unused_input_names", ()), "num_audio_tokens"}
        for key, value in encoded.items():
            if key in skip or not torch.is_tensor(value):
                continue
            if self.feature_dtype is not None and value.is_floating_point():
                value = value.to(self.feature_dtype)
            batch[key] = value
        return batch


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


def make_trainer(
    model,
    processor,
    dataset,
    out_dir: str | Path,
    *,
    lora_r: int = 16,
    lora_alpha: int = 32,
    lora_dropout: float = 0.05,
    beta: float = 0.1,
    learning_rate: float = 5e-5,
    epochs: float = 1.0,
    batch_size: int = 8,
    max_steps: int = -1,
    modules_to_save: list[str] | None = None,
    load_audio: Callable[[str], np.ndarray] | None = None,
    seed: int = 0,
    logging_steps: int = 10,
    audio_root: str | Path | None = None,
    gradient_accumulation_steps: int = 1,
    gradient_checkpointing: bool | None = None,
    max_completion_tokens: int | None = None,
    bf16: bool | None = None,
):
    """The configured :class:`AudioDPOTrainer` (model wrapped with LoRA), not yet trained. See :func:`train_dpo`."""
    from trl import DPOConfig
    from trl.trainer.utils import disable_dropout_in_model

    model_family(model)  # raises on anything else
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    bf16 = (cuda and torch.cuda.is_bf16_supported()) if bf16 is None else bf16
    gradient_checkpointing = cuda if gradient_checkpointing is None else gradient_checkpointing

    # TRL's default (disable_dropout=True) would also zero LoRA's dropout. Instead the base network is made
    # deterministic here (so the adapter-disabled reference is exact) and LoRA dropout stays as asked.
    disable_dropout_in_model(model)
    processor.tokenizer.padding_side = "left"

    args = DPOConfig(
        output_dir=str(out_dir),
        beta=beta,
        learning_rate=learning_rate,
        num_train_epochs=epochs,
        max_steps=max_steps,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps,
        gradient_checkpointing=gradient_checkpointing,
        seed=seed,
        data_seed=seed,
        logging_steps=logging_steps,
        logging_first_step=True,
        report_to=[],
        save_strategy="no",
        remove_unused_columns=False,
        use_cpu=not cuda,
        bf16=bf16,
        fp16=False,
        max_length=None,  # the collator never cuts prompts (audio tokens); see max_completion_tokens
        disable_dropout=False,
        precompute_ref_log_probs=False,
        dataloader_num_workers=0,
    )
    collator = AudioPreferenceCollator(
        processor=processor,
        load_audio=load_audio or load_audio_file,
        audio_root=Path(audio_root) if audio_root is not None else None,
        sample_rate=int(getattr(processor.feature_extractor, "sampling_rate", SAMPLE_RATE)),
        max_completion_tokens=max_completion_tokens,
        feature_dtype=next(model.parameters()).dtype,  # a bf16-loaded encoder needs bf16 features; autocast does the rest
    )
    AudioDPOTrainer, DPOLogCallback = _trainer_classes()
    trainer = AudioDPOTrainer(
        model=model,
        args=args,
        data_collator=collator,
        train_dataset=dataset,
        processing_class=processor,
        peft_config=lora_config(model, lora_r, lora_alpha, lora_dropout, modules_to_save),
        callbacks=[DPOLogCallback(out_dir)],
    )
    return trainer


def train_dpo(
    model,
    processor,
    dataset: "datasets.Dataset",  # noqa: F821
    out_dir: str | Path,
    *,
    lora_r: int = 16,
    lora_alpha: int = 32,
    lora_dropout: float = 0.05,
    beta: float = 0.1,
    learning_rate: float = 5e-5,
    epochs: float = 1.0,
    batch_size: int = 8,
    max_steps: int = -1,
    modules_to_save: list[str] | None = None,
    load_audio: Callable[[str], np.ndarray] | None = None,
    seed: int = 0,
    logging_steps: int = 10,
    audio_root: str | Path | None = None,
    gradient_accumulation_steps: int = 1,
    gradient_checkpointing: bool | None = None,
    max_completion_tokens: int | None = None,
    bf16: bool | None = None,
) -> Path:
    """DPO with LoRA scoped to the language model; returns the exported adapter directory.

    Writes, under ``out_dir``:

    * ``adapter/`` — ``adapter_config.json`` + ``adapter_model.safetensors`` (``PeftModel.from_pretrained``;
      plain LoRA on the decoder's linears, the form vLLM's LoRA loader takes — ``modules_to_save`` is a
      PEFT-only extra that vLLM ignores), ``earwitness_dpo.json`` (the settings) and a copy of the processor,
      so :func:`export_merged` can ship a complete checkpoint.
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
    trainer = make_trainer(
        model, processor, dataset, out_dir,
        lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, beta=beta, learning_rate=learning_rate,
        epochs=epochs, batch_size=batch_size, max_steps=max_steps, modules_to_save=modules_to_save,
        load_audio=load_audio, seed=seed, logging_steps=logging_steps, audio_root=audio_root,
        gradient_accumulation_steps=gradient_accumulation_steps, gradient_checkpointing=gradient_checkpointing,
        max_completion_tokens=max_completion_tokens, bf16=bf16,
    )
    result = trainer.train()
    adapter_dir = Path(out_dir) / "adapter"
    export_adapter(trainer, adapter_dir, extra={
        "beta": beta, "learning_rate": learning_rate, "epochs": epochs, "batch_size": batch_size,
        "max_steps": max_steps, "global_step": trainer.state.global_step, "seed": seed,
        "lora_r": lora_r, "lora_alpha": lora_alpha, "lora_dropout": lora_dropout,
        "modules_to_save": modules_to_save, "train_loss": float(result.training_loss),
        "pairs": len(dataset) if hasattr(dataset, "__len__") else None, "kinds": _kind_counts(dataset),
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
        "family": model_family(base),
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


# --------------------------------------------------------------------------------------------- merge


def _model_class_for(model_type: str):
    import transformers

    names = {"qwen2_audio": "Qwen2AudioForConditionalGeneration", "qwen2_5_omni_thinker": "Qwen2_5OmniThinkerForConditionalGeneration"}
    if model_type not in names:
        raise ValueError(f"unsupported model type {model_type!r}; known: {', '.join(names)}")
    return getattr(transformers, names[model_type])


def export_merged(base_model, adapter_dir: str | Path, out_dir: str | Path, processor=None) -> Path:
    """Merge a LoRA adapter into the base weights and save a full checkpoint (weights + processor).

    ``base_model`` is a checkpoint directory or a loaded, *untouched* base model (not the instance that
    :func:`train_dpo` trained in place, which already carries LoRA layers). The processor is taken from
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
        base_model = _model_class_for(config.model_type).from_pretrained(source, local_files_only=source.is_dir(), dtype="auto")
    if hasattr(base_model, "peft_config") or any(isinstance(m, BaseTunerLayer) for m in base_model.modules()):
        raise ValueError("export_merged needs a base model without LoRA layers (pass its checkpoint directory)")
    model_family(base_model)
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
