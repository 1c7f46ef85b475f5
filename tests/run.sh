#!/usr/bin/env bash
# Set up .venv (if needed) and run the whole test suite (~10 minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
. .venv/bin/activate
python -m pytest -q "$@"
