"""``earwitness train dpo --workers 2``: Ray Train DDP (gloo, CPU) on a tiny random Qwen2-Audio.

One 2-worker run with a worker killed (SIGKILL) after its first checkpoint, beside one process with the same global
batch (half the per-worker batch):

* Ray Train restarts the group from that checkpoint (``--max-failures 1``): the workers are new processes.
* Its final adapter reaches the one-process adapter within 1e-4 and its loss curve (steps before the kill logged by
  the first group, after it by the restarted one) is the same within 1e-4: gradients are averaged over the workers
  (sums run in another order), and the restart resumes model, optimizer, scheduler and data position exactly. The
  3 steps stay inside the first epoch: a last, partial batch is padded differently by 1 and 2 workers.

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
            "--batch-size", str(batch), "--save-steps", "1", "--logging-steps", "1", "--lora-dropout", "0", "--learning-rate", "1e-2",
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


def _json_or_none(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # not there yet, or caught mid-write
        return None


def _rows(path: Path) -> list[dict]:
    """The jsonl rows written so far (a last line caught mid-write left out)."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    rows = []
    for line in lines:
        try:
            rows.append(json.loads(line))
        except ValueError:
            break
    return rows


def _kill_a_worker_after_a_checkpoint(proc: subprocess.Popen, out: Path, victim_rank: str = "1", timeout_s: float = 300) -> int:
    """SIGKILL one worker of a running group once Ray Train holds a checkpoint and before the last step is logged. The
    workers are paused (SIGSTOP) while the run's directory is looked at and the victim is killed before they continue:
    the run cannot move on between the look and the kill. Returns the victim's pid."""
    deadline = time.monotonic() + timeout_s
    while True:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline, f"no Ray checkpoint after {timeout_s:.0f} s"
        workers = _json_or_none(out / "workers.json") or {}
        if len(workers) == 2:
            for pid in workers.values():
                os.kill(pid, signal.SIGSTOP)
            try:
                logged = [row["step"] for row in _rows(out / "dpo_log.jsonl")]
                if list(out.glob("ray/checkpoint_*")) and max(logged, default=0) < 3:  # the step-1 or step-2 checkpoint
                    os.kill(workers[victim_rank], signal.SIGKILL)
                    return workers[victim_rank]
            finally:
                for pid in workers.values():
                    try:
                        os.kill(pid, signal.SIGCONT)
                    except ProcessLookupError:  # the victim
                        pass
        time.sleep(0.2)


@pytest.fixture(scope="module")
def runs(tiny_checkpoint, corpus, tmp_path_factory):
    """The killed 2-worker run and, at the same time, the one-process run; returns their directory and the victim's pid."""
    from concurrent.futures import ThreadPoolExecutor

    from earwitness.cli import main

    root = tmp_path_factory.mktemp("ray-train")
    killed = _spawn(_argv(tiny_checkpoint, corpus, root / "killed", 2, "--workers", "2", "--max-failures", "1"))
    with ThreadPoolExecutor(1) as pool:
        victim = pool.submit(_kill_a_worker_after_a_checkpoint, killed, root / "killed")
        assert main(_argv(tiny_checkpoint, corpus, root / "one", 4)) == 0  # one process, the same global batch of 4 pairs
        victim = victim.result()
    _finish(killed)
    return root, victim


def test_killed_worker_restarts_from_its_checkpoint(runs):
    root, victim = runs
    assert json.loads((root / "killed" / "workers.json").read_text())["1"] != victim, "the group was not restarted"
    stage = json.loads((root / "killed" / "stage.json").read_text())
    assert stage["scale"]["workers"] == 2 and stage["metrics"]["steps"] == 3


def test_two_workers_match_one_process(runs):
    root, _ = runs
    worst = _worst(_adapter(root / "one"), _adapter(root / "killed"))
    assert worst < TOLERANCE, f"2 workers (one killed and restarted) vs 1 process: adapters differ by {worst:.2e}"
    one, two = _losses(root / "one"), _losses(root / "killed")
    assert len(one) == len(two) == 3
    assert max(abs(a - b) for a, b in zip(one, two)) < TOLERANCE, (one, two)
