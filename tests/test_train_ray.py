"""``earwitness train dpo --workers 2``: Ray Train DDP (gloo, CPU) on a tiny random Qwen2-Audio.

* Two workers with half the per-worker batch (the same global batch) reach the one-process adapter within 1e-4 and
  log the same loss curve within 1e-4 (gradients are averaged over the workers; sums run in another order). The
  3 steps stay inside the first epoch: a last, partial batch is padded differently by 1 and 2 workers.
* A worker killed (SIGKILL) after the first checkpoint: Ray Train restarts the group from that checkpoint
  (``--max-failures 1``) and the final adapter equals the uninterrupted 2-worker run's within 1e-4.

Each Ray run is the command in its own process, with its own local Ray (loopback, private temp dir).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-4


def _argv(source: Path, corpus: Path, out: Path, batch: int, *extra: str) -> list[str]:
    return ["train", "dpo", "--from", str(source), "--corpus", str(corpus), "--out", str(out), "--pairs-per-kind", "2", "--max-steps", "3",
            "--batch-size", str(batch), "--save-steps", "2", "--logging-steps", "1", "--lora-dropout", "0", "--learning-rate", "1e-2",
            "--no-tensorboard", *extra]


def _spawn(argv: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"}
    return subprocess.Popen([sys.executable, "-m", "earwitness", *argv], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 420) -> None:
    _, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]


def _adapter(out: Path) -> dict:
    return load_file(out / "adapter" / "adapter_model.safetensors")


def _worst(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "dpo_log.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def runs(tiny_checkpoint, corpus, tmp_path_factory):
    from earwitness.cli import main

    root = tmp_path_factory.mktemp("ray-train")
    two = _spawn(_argv(tiny_checkpoint, corpus, root / "two", 2, "--workers", "2"))
    assert main(_argv(tiny_checkpoint, corpus, root / "one", 4)) == 0  # one process, the same global batch of 4 pairs
    _finish(two)
    return root


def test_two_workers_match_one_process(runs):
    worst = _worst(_adapter(runs / "one"), _adapter(runs / "two"))
    assert worst < TOLERANCE, f"2 workers vs 1 process: adapters differ by {worst:.2e}"
    one, two = _losses(runs / "one"), _losses(runs / "two")
    assert len(one) == len(two) == 3
    assert max(abs(a - b) for a, b in zip(one, two)) < TOLERANCE, (one, two)
    stage = json.loads((runs / "two" / "stage.json").read_text())
    assert stage["scale"]["workers"] == 2 and stage["metrics"]["steps"] == 3


def test_killed_worker_restarts_from_its_checkpoint(runs, tiny_checkpoint, corpus):
    out = runs / "killed"
    proc = _spawn(_argv(tiny_checkpoint, corpus, out, 2, "--workers", "2", "--max-failures", "1"))
    deadline = time.time() + 300
    while not list(out.glob("ray/checkpoint_*")):  # Ray Train holds the step-2 checkpoint
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() < deadline, "no Ray checkpoint after 300 s"
        time.sleep(0.2)
    victim = json.loads((out / "workers.json").read_text())["1"]
    os.kill(victim, signal.SIGKILL)
    _finish(proc)
    assert json.loads((out / "workers.json").read_text())["1"] != victim, "the group was not restarted"
    worst = _worst(_adapter(out), _adapter(runs / "two"))
    assert worst < TOLERANCE, f"restarted run vs uninterrupted: adapters differ by {worst:.2e}"
