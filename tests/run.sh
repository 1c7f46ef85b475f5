#!/usr/bin/env bash
# Set up the environment (if needed) and run the test suite. Python 3.12 available: megatron-core 0.19
# in .venv; only Python 3.11: megatron-core 0.16 (see tools/setup_env.sh for PYTHON, PYTHON_VERSION, VENV).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
. "${VENV:-.venv}/bin/activate"
python -m pytest -q "$@"
