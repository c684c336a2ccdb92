#!/usr/bin/env bash
# Create .venv and install prism-moe with its test tools. Safe to run again (it only adds what is missing).
# PyTorch is pinned first: a bare `torch` requirement can pull gigabytes of CUDA wheels on a CPU machine.
# Override with PRISM_TORCH_SPEC (e.g. "torch==2.13.0" from a CUDA index on a GPU server).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "prism-moe needs Python 3.11 or newer")'
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PY" -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.prism-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "setup: installing dependencies (first run takes a few minutes)"
  python -m pip install -q --upgrade pip "setuptools>=77" 2>&1 | grep -v -i warning || true  # SPDX licence strings
  python -c 'import torch' 2>/dev/null || python -m pip install -q "${PRISM_TORCH_SPEC:-torch==2.13.0}" 2>&1 | grep -v -i warning || true
  python -m pip install -q -e ".[test]" 2>&1 | grep -v -i warning || true
  python -c 'import prism_moe, torch, transformers, zmq, highspy' # fail loudly if an install did not work
  touch "$stamp"
fi
