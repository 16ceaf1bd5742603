#!/usr/bin/env bash
# Create the virtual environment (.venv, or $VENV) if it is missing and install dcls_timm into it, editable,
# with its test extras. Re-running is cheap: it reinstalls only when setup.cfg changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.dcls_timm-installed"
if [ ! -f "$stamp" ] || [ setup.cfg -nt "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "[setup] installing dcls_timm and its dependencies into $VENV (first time: a few minutes)"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q -e ".[test]"
    "$VENV/bin/python" -m pip install -q --no-deps imagecorruptions==1.1.2
    touch "$stamp"
fi
