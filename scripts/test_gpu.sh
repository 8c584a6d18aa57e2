#!/usr/bin/env bash
# The GPU test set: `pytest -m gpu` (tests/test_gpu.py): every decode path (graphed SDPA,
# graphed Triton, shared prefix, compiled) gives the eager decode's greedy answers on a
# random-init model of a small real shape, and the sampler never draws outside the support of
# Hugging Face's temperature/top-k/top-p warpers; and (tests/test_gpu_stage.py) `patchdb
# generate` on CUDA over a dose series with baselines writes every unit and, at temperature 0,
# the CPU eager decode's answers key for key (with two GPUs, `--gpus 2` the same rows). Run it
# in any change that touches the graphed,
# compiled, shared-prefix or sampling code, on a machine with an NVIDIA GPU.
#
#   bash scripts/test_gpu.sh            # uses .venv (scripts/setup.sh makes it), else python3
#   bash scripts/test_gpu.sh -x -k triton   # extra arguments go to pytest
#   PATCHDB_PYTHON=python3 PYTHONPATH=$PWD bash scripts/test_gpu.sh   # a python3 that holds a
#                                   # CUDA torch already (patchdb's other dependencies importable)
#
# Without a CUDA GPU this fails with one Error line instead of skipping every test.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PATCHDB_PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "Error: torch in $PY sees no CUDA GPU; the gpu tests need one" >&2
  exit 1
fi
"$PY" -c 'import torch; print("test_gpu: torch", torch.__version__, "on", torch.cuda.get_device_name(0))'
exec "$PY" -m pytest -q -p no:cacheprovider -m gpu -rs "$@" tests
