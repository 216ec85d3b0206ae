"""A training stage on Ray Train: data-parallel workers (DDP, or FSDP with ``--fsdp 'full_shard auto_wrap'``) on one machine or a Ray cluster.

``TorchTrainer`` starts ``workers`` processes with torch.distributed set up (gloo on CPUs, NCCL on GPUs); each runs the
same stage as a single process would (:func:`train.stages.run_job`) with its transformers / TRL trainer prepared for
Ray Train (``prepare_trainer``) and reporting its checkpoints (``RayTrainReportCallback``). Each worker takes its own
``batch_size`` rows of every global batch, so ``workers × batch_size`` is the global batch. A worker that dies makes
Ray restart the group (``FailureConfig(max_failures)``) from the last reported checkpoint: adapter, optimizer,
scheduler, RNG and data position, as ``--resume`` would.

A local Ray binds loopback with its own temp dir and keeps Ray 2.60's token authentication (as ``serving.runtime``);
``address`` joins a running cluster instead (``auto`` inside a RayJob's submitter, ``ray://host:10001`` from outside).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import replace
from pathlib import Path

from models.store import is_uri

WORKERS_FILE = "workers.json"  # rank -> pid of the current attempt's workers, for whoever has to find one


def init_ray(address: str | None, num_cpus: int | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
        return
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, _temp_dir=tempfile.mkdtemp(prefix="ew-train-ray-"),
             num_cpus=num_cpus, logging_level=logging.WARNING)


def run_on_ray(job, run, workers: int = 1, gpus_per_worker: float = 0.0, address: str | None = None, max_failures: int = 0) -> dict:
    """Run ``job`` (a :class:`train.stages.StageJob`) with ``run(job, prepare=…)`` (``train.stages.run_job``) on
    ``workers`` Ray Train workers; returns rank 0's metrics."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    out = Path(job.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    init_ray(address, num_cpus=None if address else max(workers, os.cpu_count() or 1))
    gpu = gpus_per_worker > 0
    corpus = job.corpus if is_uri(job.corpus) else str(Path(job.corpus).resolve())  # a URI: each node copies it into its store cache
    config = {"job": replace(job, out=str(out), corpus=corpus), "run": run}
    trainer = TorchTrainer(
        train_loop_per_worker=worker_loop,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpu,
                                     resources_per_worker={"GPU": gpus_per_worker} if gpu else {"CPU": 1}),
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        run_config=RunConfig(name="ray", storage_path=str(out), failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    return json.loads((out / "metrics.json").read_text())


def worker_loop(config: dict) -> None:
    """One Ray Train worker: the stage, resumed from Ray's checkpoint after a restart."""
    import ray.train
    from ray.train.huggingface.transformers import RayTrainReportCallback, prepare_trainer

    job, run_job = config["job"], config["run"]
    context = ray.train.get_context()
    out = Path(job.out)
    _record_worker(out / WORKERS_FILE, context.get_world_rank())

    def prepare(trainer):
        trainer.add_callback(RayTrainReportCallback())
        return prepare_trainer(trainer)

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        metrics = run_job(job, prepare=prepare)
    else:
        with checkpoint.as_directory() as directory:
            metrics = run_job(replace(job, resume=str(Path(directory) / RayTrainReportCallback.CHECKPOINT_NAME)), prepare=prepare)
    if context.get_world_rank() == 0:
        (out / "metrics.json").write_text(json.dumps(metrics))


def _record_worker(path: Path, rank: int) -> None:
    import fcntl

    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        known = json.loads(path.read_text() or "{}") if path.exists() else {}
        known[str(rank)] = os.getpid()
        path.write_text(json.dumps(known))
