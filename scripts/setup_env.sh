#!/usr/bin/env bash
# Create the project's virtual environment and install cosyvoice2-jax (editable) with the test,
# training, server, perceptual-metric and evaluation extras.
#
#   bash scripts/setup_env.sh [VENV_DIR]        (default .venv)
set -euo pipefail
VENV="${1:-.venv}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
export PIP_DISABLE_PIP_VERSION_CHECK=1
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q -e ".[test,train,research,serve,perceptual,eval]"
echo "project venv ready: $VENV"
