#!/usr/bin/env bash
# Create a virtual environment with megagrow and its dependencies. Safe to run again (it only fills
# what is missing).
#
# Which Python picks which megatron-core:
#   Python 3.12 (python3.12 on PATH, or a pyenv 3.12) -> the newest megatron-core (0.19.x); torch
#     from the package index (the CUDA build, about 3 GB the first time; it runs on the CPU too).
#   otherwise Python 3.11 -> megatron-core 0.16.x (the newest that supports 3.11), torch 2.13.0
#     (on a machine without CUDA the local CPU build).
# PYTHON=/path/to/python forces an interpreter; PYTHON_VERSION=3.11 picks a version;
# VENV=dir chooses the environment's folder (default .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}

find_python() {  # find_python 3.12: an interpreter of that version that really runs, or nothing
    local v=$1 candidate
    for candidate in "python$v" "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"$v".*/bin/python"$v"; do
        if "$candidate" -c "import sys; assert sys.version_info[:2] == tuple(map(int, '$v'.split('.')))" \
            >/dev/null 2>&1; then
            command -v "$candidate" 2>/dev/null || echo "$candidate"
            return 0
        fi
    done
    return 1
}

if [ ! -x "$VENV/bin/python" ]; then
    if [ -z "${PYTHON:-}" ]; then
        if [ -n "${PYTHON_VERSION:-}" ]; then
            PYTHON=$(find_python "$PYTHON_VERSION") || { echo "error: no Python $PYTHON_VERSION found" >&2; exit 1; }
        else
            PYTHON=$(find_python 3.12 || find_python 3.11 || echo python3)
        fi
    fi
    echo "megagrow set-up: $VENV with $("$PYTHON" --version 2>&1) ($PYTHON)"
    "$PYTHON" -m venv "$VENV"
fi
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
    if python -c "import sys; sys.exit(sys.version_info < (3, 12))"; then
        echo "megagrow set-up: installing torch from the package index (the CUDA build, about 3 GB; pip's cache makes the next set-up fast)"
        python -m pip install -q torch
    else
        # On a machine without CUDA, 2.13.0 is the local CPU build; plain `torch` would pull the CUDA build.
        python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
    fi
fi
python -m pip install -q -e ".[test]"
python -c "import megagrow, torch, megatron.core; from importlib.metadata import version; print(f'megagrow env ready: Python {__import__(\"sys\").version.split()[0]}, torch {torch.__version__}, megatron-core {version(\"megatron-core\")}')"
