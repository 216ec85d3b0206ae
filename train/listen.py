"""LISTEN on any supported family: the audio adapter learns, the language model and the audio tower stay frozen.

The model answers the corpus's questions (present and absent sounds alike) over each clip, decoded in the
DataLoader's workers by :class:`~train.dpo_collator.AudioSFTCollator`; transformers' ``Trainer`` drives it, so LISTEN
checkpoints, resumes, logs to TensorBoard and runs under Ray Train exactly as DPO does (:mod:`train.options`).

The output is a PEFT adapter directory: the trained audio adapter as ``modules_to_save`` (Qwen2-Audio's
``multi_modal_projector``; the Omni thinker's ``audio_tower.ln_post`` and ``audio_tower.proj``). PEFT needs a LoRA
target besides; a rank-1 LoRA on the language model whose B stays zero and frozen carries it and changes nothing.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from models.families import audio_adapter_modules, family_of, unwrap
from train.data.qa import read_qa_rows
from train.dpo_collator import SAMPLE_RATE, AudioSFTCollator
from train.lora import lora_config
from train.options import ListenConfig, resume_point, trainer_arguments


def listen_rows(corpus_dir: Path, split: str, config: ListenConfig):
    """The split's questions of ``config.kinds`` as a ``datasets.Dataset`` (prompt, chosen = the answer, audio path), or
    with ``config.streaming`` an ``IterableDataset`` read from ``qa/<split>.jsonl`` as training goes."""
    from datasets import Dataset, load_dataset

    base = Path(corpus_dir).resolve()

    def row(r: dict) -> dict:
        return {"prompt": r["question"], "chosen": r["answer"], "audio": str(base / r["audio"]), "kind": r["kind"]}

    if config.streaming:
        stream = load_dataset("json", data_files=str(base / "qa" / f"{split}.jsonl"), split="train", streaming=True)
        stream = stream.filter(lambda r: r["kind"] in config.kinds).map(row, remove_columns=list(stream.features or []) or None)
        stream = stream.shuffle(seed=config.seed, buffer_size=1000)
        return stream.take(config.max_rows) if config.max_rows else stream

    rows = [row({"question": r.question, "answer": r.answer, "audio": r.audio, "kind": r.kind})
            for r in read_qa_rows(base, split) if r.kind in config.kinds]
    data = Dataset.from_list(rows).shuffle(seed=config.seed)
    return data.select(range(min(config.max_rows, len(data)))) if config.max_rows else data


def make_listen_trainer(model, processor, dataset, out_dir: Path, config: ListenConfig, resume: bool = False):
    """transformers' ``Trainer`` over ``model`` wrapped for LISTEN: its audio adapter trainable, all else frozen."""
    from peft import get_peft_model
    from transformers import Trainer, TrainingArguments

    family_of(model)
    out_dir.mkdir(parents=True, exist_ok=True)
    peft_model = get_peft_model(model, lora_config(model, r=1, alpha=1, dropout=0.0, modules_to_save=audio_adapter_modules(model)))
    for name, param in peft_model.named_parameters():
        param.requires_grad = "modules_to_save" in name
    processor.tokenizer.padding_side = "left"
    collator = AudioSFTCollator(
        processor=processor,
        audio_root=Path(config.audio_root) if config.audio_root is not None else None,
        sample_rate=int(getattr(processor.feature_extractor, "sampling_rate", SAMPLE_RATE)),
        max_completion_tokens=config.max_completion_tokens,
        feature_dtype=next(model.parameters()).dtype,
    )
    return Trainer(model=peft_model, args=TrainingArguments(**trainer_arguments(config, out_dir)), data_collator=collator,
                   train_dataset=dataset, callbacks=[JsonlLog(out_dir / "listen_log.jsonl", resume)])


def train_listen(model, processor, dataset, out_dir: str | Path, config: ListenConfig | None = None, *, resume: bool | str = False,
                 prepare: Callable[[Any], Any] | None = None) -> Path:
    """LISTEN in place over ``model``; returns the adapter directory (``out_dir/adapter``) with the processor beside it.

    ``resume`` and ``prepare`` as in :func:`train.dpo.train_dpo`.
    """
    config, out_dir = config or ListenConfig(), Path(out_dir)
    trainer = make_listen_trainer(model, processor, dataset, out_dir, config, resume=bool(resume))
    if prepare is not None:
        trainer = prepare(trainer)
    result = trainer.train(resume_from_checkpoint=resume_point(resume, out_dir))
    adapter_dir = out_dir / "adapter"
    trainer.accelerator.wait_for_everyone()
    if trainer.accelerator.is_main_process:
        peft_model = trainer.accelerator.unwrap_model(trainer.model)
        peft_model.save_pretrained(str(adapter_dir))
        processor.save_pretrained(str(adapter_dir))
        note = {"family": family_of(peft_model).name, "stage": "listen", "train_loss": float(result.training_loss),
                "global_step": trainer.state.global_step, "trained": audio_adapter_modules(peft_model), "listen_config": asdict(config)}
        (adapter_dir / "earwitness_listen.json").write_text(json.dumps(note, indent=2, default=str) + "\n")
    peft_model.eval()
    return adapter_dir


def apply_audio_adapter(model, adapter_dir: str | Path):
    """``model`` with a LISTEN (or DPO) adapter's trained audio adapter copied into its own modules, and no PEFT
    layers: what DPO starts from and keeps as its reference (its LoRA, zero in LISTEN, is left out, not merged, so
    a 4-bit base is not requantised)."""
    from peft import PeftModel
    from peft.utils import ModulesToSaveWrapper

    peft_model = PeftModel.from_pretrained(model, str(adapter_dir))
    with torch.no_grad():
        for module in peft_model.modules():
            if isinstance(module, ModulesToSaveWrapper):
                module.original_module.load_state_dict(module.modules_to_save["default"].state_dict())
    return unwrap(peft_model.unload())


class JsonlLog(TrainerCallback):
    """Appends every logged step to a jsonl file (kept across ``--resume``)."""

    def __init__(self, path: Path, resume: bool = False):
        self.path = path
        if not (resume and path.exists()):
            path.write_text("")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs and state.is_world_process_zero:
            row = {"step": state.global_step, **{k: float(v) for k, v in logs.items() if isinstance(v, (int, float))}}
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")
