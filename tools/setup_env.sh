#!/usr/bin/env bash
# Create .venv with megagrow and its dependencies. Safe to run again (it only fills what is missing).
# torch is installed first and pinned: on a machine without CUDA, 2.13.0 is the local CPU build;
# asking pip for plain `torch` would pull the CUDA build (several GB).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==${TORCH_VERSION}"
python -m pip install -q -e ".[test]"
python -c "import megagrow, torch, megatron.core; print(f'megagrow env ready: torch {torch.__version__}, megatron-core {megatron.core.__version__}')"
