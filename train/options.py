"""The settings of the trainer-driven stages (LISTEN, DPO): the ones they share (precision, memory, checkpoints,
tracking, data workers) and each stage's own.

Dataclasses, each field with its help as TRL's configs carry it; :func:`trainer_arguments` turns them into the keyword
arguments of transformers' ``TrainingArguments`` (and TRL's ``DPOConfig``, its subclass), so a checkpoint, a resumed
run and a TensorBoard curve mean the same thing in every stage. The command line builds its stage flags from these
classes, so this module imports no torch, transformers, PEFT or TRL: ``earwitness --help`` and ``earwitness ask``
start without them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path


@dataclass
class TrainOptions:
    """Settings of a trainer-driven stage; a stage's own config adds its fields to these."""

    learning_rate: float = field(default=5e-5, metadata={"help": "Peak learning rate of what the stage trains."})
    epochs: float = field(default=1.0, metadata={"help": "Passes over the data (ignored when max_steps > 0)."})
    batch_size: int = field(default=8, metadata={"help": "Rows (LISTEN) or pairs (DPO) per device step."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Steps whose gradients are summed before an update."})
    max_steps: int = field(default=-1, metadata={"help": "Stop after this many updates; -1: run the epochs."})
    seed: int = field(default=0, metadata={"help": "Seed of the initialisation and of the data order."})
    logging_steps: int = field(default=10, metadata={"help": "Log (jsonl, TensorBoard) every this many steps; the last is always logged."})
    audio_root: str | Path | None = field(default=None, metadata={"help": "Directory that relative audio paths are joined to."})
    max_completion_tokens: int | None = field(default=None, metadata={
        "help": "Cut answers to this many tokens; prompts are never cut (their audio tokens must match the features)."})
    gradient_checkpointing: bool | None = field(default=None, metadata={"help": "Recompute activations in the backward pass; None: on with CUDA."})
    bf16: bool | None = field(default=None, metadata={"help": "Train in bfloat16; None: on with CUDA where supported."})
    load_in_4bit: bool = field(default=False, metadata={
        "help": "QLoRA: load the base's language model in 4-bit NF4 (bitsandbytes); the audio tower, audio adapter and LM head stay in bf16."})
    save_steps: int = field(default=0, metadata={
        "help": "Save a checkpoint (adapter, optimizer, scheduler, RNG, data position) every this many steps; 0: none."})
    save_total_limit: int = field(default=2, metadata={"help": "Checkpoints kept (the oldest are deleted)."})
    tensorboard: bool = field(default=True, metadata={"help": "Write TensorBoard event files under <out>/runs/."})
    dataloader_num_workers: int = field(default=0, metadata={
        "help": "Processes that decode and featurise audio for the batches; 0: the training process itself."})
    streaming: bool = field(default=False, metadata={
        "help": "Read the corpus's rows as a stream (datasets' IterableDataset, shuffled in a buffer): a corpus larger than memory; "
                "set max_steps."})
    fsdp: str = field(default="", metadata={
        "help": "FSDP over the data-parallel workers (e.g. 'full_shard auto_wrap'), for trainable state that one GPU cannot hold; '': DDP."})



@dataclass
class ListenConfig(TrainOptions):
    """LISTEN's settings (:mod:`train.listen`): the shared trainer settings plus which questions it learns from."""

    learning_rate: float = field(default=2e-4, metadata={"help": "Peak learning rate of the audio adapter."})
    kinds: tuple[str, ...] = field(default=("presence",), metadata={
        "help": "Question kinds learnt (presence, order, count, duration, caption); LISTEN's are present and absent sounds."})
    max_rows: int | None = field(default=None, metadata={"help": "Learn from at most this many rows (a seeded sample); None: all."})


@dataclass
class AudioDPOConfig(TrainOptions):
    """The settings of one DPO run (:func:`train.dpo.make_trainer`, :func:`train.dpo.train_dpo`), each field with its help as in
    TRL's configs; ``asdict`` of it is written next to the adapter (``earwitness_dpo.json``, ``dpo_config``)."""

    lora_r: int = field(default=16, metadata={"help": "LoRA rank on the language model's linear layers."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling α (the update is scaled by α / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on LoRA's input; the base network's dropout is always off."})
    modules_to_save: list[str] | None = field(default=None, metadata={
        "help": "Modules saved as full copies with the adapter (e.g. the LISTEN audio adapter): a PEFT-only extra that vLLM does not load."})
    train_saved_modules: bool = field(default=True, metadata={
        "help": "Whether the modules_to_save copies learn too; False: LoRA on the language model alone learns, the copies ride along."})
    beta: float = field(default=0.1, metadata={"help": "DPO β: how far the policy may move from the reference."})


def add_arguments(parser, config_class, skip: tuple[str, ...] = ()) -> None:
    """One ``--flag`` per field of a config dataclass, its help the field's (as TRL's parsers do); values left
    unset stay the dataclass's defaults (:func:`chosen`)."""
    import argparse

    for f in fields(config_class):
        if f.name in skip:
            continue
        flag, kind = "--" + f.name.replace("_", "-"), str(f.type)
        kw: dict = {"dest": f.name, "default": argparse.SUPPRESS, "help": f.metadata.get("help", "")}
        if kind.startswith("bool"):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif kind.startswith(("tuple", "list")):
            parser.add_argument(flag, nargs="+", **kw)
        else:
            parser.add_argument(flag, type=int if kind.startswith("int") else float if kind.startswith("float") else str, **kw)


def chosen(args, config_class) -> dict:
    """The config fields a command line set (see :func:`add_arguments`)."""
    values = {f.name: getattr(args, f.name) for f in fields(config_class) if hasattr(args, f.name)}
    return {k: tuple(v) if str(next(f.type for f in fields(config_class) if f.name == k)).startswith("tuple") else v for k, v in values.items()}


def help_of(config) -> dict[str, str]:
    """Each field's help text, as ``stage.json`` records it beside the values."""
    return {f.name: f.metadata.get("help", "") for f in fields(config)}


def trainer_arguments(options: TrainOptions, out_dir: Path) -> dict:
    """``TrainingArguments`` keywords for ``options``: checkpoints every ``save_steps`` (none when 0), TensorBoard
    event files under ``out_dir/runs``, every column kept for the audio collators, bf16 and gradient checkpointing on
    with CUDA unless the options say otherwise."""
    import torch  # only where a stage trains: the command line reads this module's configs without torch

    cuda = torch.cuda.is_available()
    workers = options.dataloader_num_workers
    return dict(
        output_dir=str(out_dir),
        learning_rate=options.learning_rate,
        num_train_epochs=options.epochs,
        max_steps=options.max_steps,
        per_device_train_batch_size=options.batch_size,
        gradient_accumulation_steps=options.gradient_accumulation_steps,
        activation_checkpointing=cuda if options.gradient_checkpointing is None else options.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},  # the reentrant form loses gradients of a frozen base's inputs
        seed=options.seed,
        data_seed=options.seed,
        logging_steps=options.logging_steps,
        logging_first_step=True,
        report_to=["tensorboard"] if options.tensorboard else [],
        save_strategy="steps" if options.save_steps else "no",
        save_steps=options.save_steps or 500,
        save_total_limit=options.save_total_limit,
        remove_unused_columns=False,
        use_cpu=not cuda,
        bf16=uses_bf16(options),
        fp16=False,
        dataloader_num_workers=workers,
        dataloader_persistent_workers=workers > 0,
        **({"fsdp": options.fsdp, "fsdp_config": {"use_orig_params": True}} if options.fsdp else {}),  # PEFT: frozen and trained in one unit
    )


def uses_bf16(options: TrainOptions) -> bool:
    """bf16 as asked, or (None) wherever CUDA supports it: the weights are loaded in it and the trainer computes in it."""
    if options.bf16 is not None:
        return options.bf16
    import torch  # only where a stage trains: the command line reads this module's configs without torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def last_checkpoint(out_dir: Path) -> str | None:
    """The newest ``checkpoint-N`` directory a trainer wrote under ``out_dir`` (what ``--resume`` continues from)."""
    steps = sorted((int(p.name.split("-")[1]), p) for p in Path(out_dir).glob("checkpoint-*") if p.name.split("-")[1].isdigit())
    return str(steps[-1][1]) if steps else None


def resume_point(resume: bool | str | None, out_dir: Path) -> str | None:
    """What ``Trainer.train(resume_from_checkpoint=…)`` gets: a named checkpoint, the newest under ``out_dir`` for True
    (None when the run saved none yet: it starts over), or None."""
    if not resume:
        return None
    return str(resume) if isinstance(resume, (str, Path)) else last_checkpoint(out_dir)
