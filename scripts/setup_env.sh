#!/usr/bin/env bash
# Create the project's virtual environment and install cosyvoice2-jax (editable) with the test,
# training, server, perceptual-metric, evaluation and notebook extras, and register the venv as a
# Jupyter kernel (inside the venv).
#
#   bash scripts/setup_env.sh [VENV_DIR]        (default .venv)
set -euo pipefail
VENV="${1:-.venv}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
export PIP_DISABLE_PIP_VERSION_CHECK=1
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q -e ".[test,train,research,serve,perceptual,eval,notebooks]"
# kernel spec inside the venv (jupyter lab started from it lists "Python (cosyvoice2-jax)"); the tests need none
"$VENV/bin/python" -m ipykernel install --sys-prefix --name cosyvoice2-jax --display-name "Python (cosyvoice2-jax)" >/dev/null
echo "project venv ready: $VENV"
