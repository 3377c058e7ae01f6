#!/usr/bin/env bash
# Creates .venv (if missing) with the CPU build of torch 2.13.0 installed *before* metaloop,
# so pip never pulls a multi-GB CUDA build, then installs metaloop in editable mode with its
# test extras. Never installs torchvision (its PyPI build does not match the CPU torch).
# Idempotent: a second run only checks that everything is in place.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import torch, sys; sys.exit(0 if torch.__version__.startswith(('2.13.0',)) or '${METALOOP_KEEP_TORCH:-}' else 1)" 2>/dev/null; then
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q "torch==2.13.0"
fi
if ! .venv/bin/python -c "import metaloop, pytest, xdist, lightning, hydra, torchmetrics" 2>/dev/null \
   || [ pyproject.toml -nt .venv/.metaloop-installed ]; then
    .venv/bin/python -m pip install -q -e ".[test]"
    touch .venv/.metaloop-installed
fi
