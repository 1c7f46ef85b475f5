#!/usr/bin/env bash
# The first command: set up .venv (nothing else needed), then `megagrow demo`: a staged G_stack run
# (LAG choosing the operator) against training from scratch on the same FLOPs budget, on the
# embedded corpus, with TP/DP > 1 on CPU. Prints `speed-up: X.XX`; report in runs/demo/run/report.md.
# About 12 minutes on 2 CPU cores; pass --quick for a 2-minute check of the pipeline, or
# --data corpus.jsonl --output DIR for your own text.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
. .venv/bin/activate
megagrow demo "$@"
