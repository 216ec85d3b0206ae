"""Stages as commands over directories: ``train listen`` → ``train dpo`` → ``eval`` → ``export``, each reading the
previous one by its directory and writing its own, with ``stage.json`` to say what it is.

A stage starts ``--from`` a registered name (earwitness-tiny, earwitness-small, qwen2-audio-7b-instruct,
qwen2.5-omni-7b), a checkpoint directory or hub id of either family, or an earlier stage's directory (its base and its
adapter; or the whole checkpoint it wrote, as ``train base``, ``train lookup`` and ``export`` do). Its output directory
holds ``adapter/`` (a PEFT adapter that ``earwitness serve --adapter`` loads on the base), ``stage.json`` (its config with each field's help, the fingerprints of its input and of the corpus, its metrics,
the package versions and its wall time), ``checkpoint-N/`` while it runs with ``--save-steps``, and TensorBoard event
files under ``runs/``. ``train.recipe`` runs the stages in order, for every model.

``--corpus``, ``--from`` and ``--out`` may be store URIs (``s3://``, ``gs://``, ``file://``…, models/store.py): inputs
are copied once into the store cache; an output is written in a local work directory named by its URI (where
``--resume`` finds its checkpoints) and uploaded when the stage finishes, ``stage.json`` last, so a stage at a URI
without ``stage.json`` is unfinished and refused as input. Storage options come from ``$EARWITNESS_STORE_OPTIONS``.
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from models.families import audio_adapter_modules
from models.loading import load_for_training
from models.registry import REGISTRY, ModelSpec, resolve
from models.small import PARTS_FILE
from models.store import StoreError, environment_options, is_uri, local_copy, work_dir
from models.store import publish as copy_out
from train.data.build import build_corpus
from train.data.prefs import load_pairs
from train.distributed import run_on_ray
from train.dpo import AudioDPOConfig, train_dpo
from train.listen import ListenConfig, apply_audio_adapter, listen_rows, train_listen
from train.options import help_of, uses_bf16

STAGE_FILE = "stage.json"
_WHOLE_FILE_BYTES = 64 << 20  # larger files are fingerprinted by size and their first and last MiB


# --------------------------------------------------------------------------------------------- records


def versions() -> dict:
    import peft
    import transformers
    import trl

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__, "trl": trl.__version__}


def fingerprint(paths: list[Path]) -> str:
    """sha256 over the files' relative names and contents (a large file: its size, first and last MiB)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in paths if p.is_file()):
        digest.update(path.name.encode())
        size = path.stat().st_size
        with path.open("rb") as f:
            if size <= _WHOLE_FILE_BYTES:
                digest.update(f.read())
            else:
                digest.update(str(size).encode() + f.read(1 << 20))
                f.seek(-(1 << 20), 2)
                digest.update(f.read())
    return digest.hexdigest()[:16]


def corpus_fingerprint(corpus_dir: Path) -> str:
    """The corpus's build report, questions and preference pairs (what a stage reads of it)."""
    pairs = [p for p in corpus_dir.glob("prefs/**/*") if not p.name.startswith("cache-")]  # datasets' index caches come and go
    return fingerprint([corpus_dir / "report.json", *corpus_dir.glob("qa/*.jsonl"), *pairs])


@dataclass(frozen=True)
class StageInput:
    """What a stage starts from: a base model and, after an earlier stage, that stage's adapter."""

    source: str  # as given to --from
    spec: ModelSpec
    adapter: Path | None = None
    stage_dir: Path | None = None
    base_source: str | None = None  # where the base is read from when that is not spec.source (a store URI's cached copy)

    @property
    def fingerprint(self) -> str:
        if self.stage_dir is not None:
            return stage_fingerprint(self.stage_dir)
        local = Path(self.spec.source)
        return fingerprint([*local.glob("*.json"), *local.glob("*.safetensors")]) if local.is_dir() else self.spec.source

    def describe(self) -> dict:
        base = {**base_record(self.spec), **({"source": self.base_source} if self.base_source else {})}
        return {"from": self.source, "base": base, "adapter": str(self.adapter) if self.adapter else None,
                "fingerprint": self.fingerprint}


def stage_fingerprint(stage_dir: Path) -> str:
    """A stage directory's identity: its ``stage.json``, the weights it holds and its adapter's."""
    return fingerprint([stage_dir / STAGE_FILE, *stage_dir.glob("*.safetensors"), *(stage_dir / "adapter").glob("adapter_*")])


def base_record(spec: ModelSpec) -> dict:
    return {"name": spec.name, "family": spec.family, "source": spec.source}


def resolve_input(source: str, family: str | None = None) -> StageInput:
    """``--from``: an earlier stage's directory (the checkpoint it wrote, or its input's base; its adapter), else a model
    by name, directory or hub id; a store URI is copied first and must hold a finished stage (``stage.json``) or a
    checkpoint (``config.json``)."""
    path = fetched(source, "--from") if is_uri(source) else Path(source)
    if (path / STAGE_FILE).exists():
        if (path / "config.json").exists() or (path / PARTS_FILE).exists():  # the stage wrote a whole checkpoint
            spec, base_source = resolve(str(path), family=family), source
        else:
            base = json.loads((path / STAGE_FILE).read_text())["input"]["base"]
            spec = resolve(base["name"]) if base["name"] in _registry() else resolve(base["source"], environment_options(), family=base["family"])
            base_source = base["source"]
        adapter = path / "adapter"
        return StageInput(source, spec, adapter if (adapter / "adapter_config.json").exists() else None, path,
                          base_source if is_uri(base_source) else None)
    if is_uri(source):
        if not any((path / marker).exists() for marker in ("config.json", PARTS_FILE)):
            raise SystemExit(f"--from {source}: neither a finished stage (no {STAGE_FILE}: a stage is uploaded with it last) "
                             "nor a model checkpoint (no config.json)")
        return StageInput(source, resolve(source, environment_options(), family=family), base_source=source)
    return StageInput(source, resolve(source, family=family))


def fetched(location: str, flag: str) -> Path:
    """A store URI's local copy (models/store.py), its failure said as the command-line error of ``flag``."""
    try:
        return local_copy(location, environment_options())
    except StoreError as exc:
        raise SystemExit(f"{flag} {location}: {exc}") from exc


def corpus_input(location: str | Path) -> Path:
    """``--corpus``: a directory, or a store URI holding a built corpus (copied once into the store cache)."""
    if not is_uri(location):
        return Path(location)
    path = fetched(str(location), "--corpus")
    if not (path / "report.json").is_file():
        raise SystemExit(f"--corpus {location}: not a built corpus (no report.json): upload one made by `earwitness data build` or `data import`")
    return path


def output_dir(location: str | Path) -> Path:
    """Where a stage writes ``--out``: the directory itself, or the local work directory of a URI (:func:`deliver`)."""
    return work_dir(str(location)) if is_uri(location) else Path(location)


def deliver(local: Path, location: str | Path) -> None:
    """Upload a finished stage written in ``output_dir(location)`` to its URI, ``stage.json`` last (a local ``--out``
    is already in place)."""
    if is_uri(location):
        copy_out(local, str(location), environment_options(), last=(STAGE_FILE,))
        print(f"uploaded {local} to {location}", flush=True)


def _registry() -> dict:
    return REGISTRY


def write_stage(out_dir: Path, stage: str, config: Any, stage_input: StageInput | None, corpus_dir: Path | None, metrics: dict,
                wall_s: float, extra: dict | None = None, corpus_location: str | None = None) -> dict:
    """``out_dir/stage.json``: what the stage was, from what (None: a first stage, whose ``extra`` says what it starts
    from), on what data (``corpus_location``: the URI a copied corpus came from), with which result."""
    record = {
        "stage": stage,
        "config": asdict(config) if config is not None else {},
        "config_help": help_of(config) if config is not None else {},
        "input": stage_input.describe() if stage_input is not None else None,
        "corpus": {"path": corpus_location or str(corpus_dir), "fingerprint": corpus_fingerprint(corpus_dir)} if corpus_dir else None,
        "metrics": metrics,
        "versions": versions(),
        "wall_s": round(wall_s, 1),
        **(extra or {}),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / STAGE_FILE).write_text(json.dumps(record, indent=2, default=str) + "\n")
    return record


def ensure_corpus(corpus_dir: Path, seed: int = 0, progress: bool = True) -> bool:
    """Build the corpus when it is missing, as ``--corpus`` promises (every package fetched with apt-get, then
    mixed); True when it was built."""
    if (corpus_dir / "report.json").exists():
        return False

    build_corpus(corpus_dir, seed=seed, progress=progress)
    return True


# --------------------------------------------------------------------------------------------- data


def preference_subset(corpus_dir: Path, per_kind: int | dict[str, int] | None, seed: int = 0, streaming: bool = False):
    """The training pairs, or a stratified sample: ``per_kind`` of every LISTEN / AHA / ACPO kind (or a count per kind);
    ``streaming``: all of them as an ``IterableDataset`` read from the arrow shards as training goes."""
    if streaming:
        if per_kind is not None:
            raise SystemExit("--streaming reads every pair: leave out --pairs-per-kind")
        return stream_pairs(Path(corpus_dir), "train", seed)

    pairs = load_pairs(corpus_dir, "train").shuffle(seed=seed)
    if per_kind is None:
        return pairs
    kinds = pairs["kind"]
    quota = per_kind if isinstance(per_kind, dict) else {k: per_kind for k in set(kinds)}
    keep, seen = [], {}
    for i, kind in enumerate(kinds):
        if seen.get(kind, 0) < quota.get(kind, 0):
            keep.append(i)
            seen[kind] = seen.get(kind, 0) + 1
    return pairs.select(keep).shuffle(seed=seed)


def stream_pairs(corpus_dir: Path, split: str, seed: int = 0, buffer_size: int = 1000):
    """``prefs/<split>``'s arrow shards as a stream, audio paths made absolute, shuffled in a buffer."""
    from datasets import load_dataset

    base = corpus_dir.resolve()
    shards = sorted(str(p) for p in (base / "prefs" / split).glob("data-*.arrow"))

    def absolute(row: dict) -> dict:
        return {"audio": str(base / row["audio"]), "rejected_audio": str(base / row["rejected_audio"]) if row["rejected_audio"] else None}

    return load_dataset("arrow", data_files=shards, split="train", streaming=True).map(absolute).shuffle(seed=seed, buffer_size=buffer_size)


# --------------------------------------------------------------------------------------------- training stages


def point_adapter_at(adapter_dir: Path, base_name: str) -> None:
    """Name the shipped adapter's base by its registry name, not the training run's directory.

    PEFT and the export note record the path the base was trained from; in a committed model that
    path means nothing on anyone else's machine. PEFT's generated README is dropped for the same
    reason: the model card beside the adapter describes it.
    """
    for name, key in (("adapter_config.json", "base_model_name_or_path"), ("earwitness_dpo.json", "base_model")):
        path = adapter_dir / name
        if path.exists():
            data = json.loads(path.read_text())
            data[key] = base_name
            path.write_text(json.dumps(data, indent=2) + "\n")


@dataclass
class StageJob:
    """One training stage, in plain values, so a Ray Train worker rebuilds it as the driver would run it."""

    stage: str  # "listen" | "dpo"
    source: str  # --from
    corpus: str
    out: str
    config: dict = field(default_factory=dict)  # ListenConfig / AudioDPOConfig fields
    per_kind: int | None = None  # DPO: pairs of each kind (None: all)
    family: str | None = None  # a hub id's family when its name does not say
    resume: bool | str = False  # True: the newest checkpoint in out; or a checkpoint directory

    def stage_config(self):
        return (ListenConfig if self.stage == "listen" else AudioDPOConfig)(**self.config)


def run_job(job: StageJob, prepare=None) -> dict:
    """Load the input, train the stage (in this process, or as one Ray Train worker through ``prepare``), save the
    adapter; returns the stage's metrics."""

    stage_input, out, corpus = resolve_input(job.source, job.family), Path(job.out), corpus_input(job.corpus)
    config = job.stage_config()
    processor, model = load_for_training(stage_input.spec, bf16=uses_bf16(config), load_in_4bit=config.load_in_4bit)
    if stage_input.adapter is not None:  # the earlier stage's audio adapter becomes part of this stage's base
        model = apply_audio_adapter(model, stage_input.adapter)
    if job.stage == "listen":
        adapter = train_listen(model, processor, listen_rows(corpus, "train", config), out, config, resume=job.resume, prepare=prepare)
        log = out / "listen_log.jsonl"
    else:

        if stage_input.adapter is not None and not config.modules_to_save:  # the adapter carries the audio adapter it was trained over
            config.modules_to_save = audio_adapter_modules(model)
            config.train_saved_modules = False
        adapter = train_dpo(model, processor, preference_subset(corpus, job.per_kind, config.seed, config.streaming), out, config,
                            resume=job.resume, prepare=prepare)
        log = out / "dpo_log.jsonl"
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.exists() else []
    last = rows[-1] if rows else {}
    return {"adapter": str(adapter), "steps": last.get("step"),
            **{k: last[k] for k in ("loss", "rewards/accuracies", "rewards/margins", "learning_rate") if k in last}}


def run_stage(job: StageJob, workers: int = 1, gpus_per_worker: float = 0.0, address: str | None = None,
              max_failures: int = 0, publish: str | None = None) -> dict:
    """A training stage in this process (``workers == 1`` and no ``address``) or on Ray Train; writes ``stage.json``;
    ``publish``: copy the adapter there too (an adapter store URI, ``s3://…/<name>``, or a directory). A URI
    ``job.out`` is written locally and uploaded at the end (:func:`deliver`); URI inputs are checked here, before any
    worker starts, and each worker reads them through the store cache."""
    started = time.time()
    stage_input, corpus = resolve_input(job.source, job.family), corpus_input(job.corpus)
    local = replace(job, out=str(output_dir(job.out)))
    if workers > 1 or address or gpus_per_worker or max_failures:

        metrics = run_on_ray(local, run_job, workers=workers, gpus_per_worker=gpus_per_worker, address=address, max_failures=max_failures)
    else:
        metrics = run_job(local)
    if publish:

        metrics["published"] = copy_out(Path(local.out) / "adapter", publish, environment_options())
    scale = {"workers": workers, "gpus_per_worker": gpus_per_worker, "address": address}
    write_stage(Path(local.out), job.stage, job.stage_config(), stage_input, corpus, metrics, time.time() - started,
                extra={"scale": scale, "per_kind": job.per_kind, "resumed": job.resume}, corpus_location=job.corpus)
    deliver(Path(local.out), job.out)
    return metrics
