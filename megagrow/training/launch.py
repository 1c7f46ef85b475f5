"""Entry point of pretrain_gpt.py: validate flags first (no megatron-core import), then train.

A bad launch must fail in a second with one line on stderr, before any process group or heavy import.
"""

from __future__ import annotations

import os
import sys

from megagrow.checkpoint.errors import CheckpointError
from megagrow.training.arguments import ArgumentError, parse_args


def _fail(message: str) -> None:
    if os.environ.get("RANK", "0") == "0":
        print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(1)


def _run_plan(argv: list[str]) -> None:
    """`pretrain_gpt.py --growth-plan PLAN [--save RUN_DIR]`: the staged-run driver (not under torchrun)."""
    import argparse
    from megagrow.scheduling.driver import run
    from megagrow.scheduling.timing import PlanError
    p = argparse.ArgumentParser(prog="pretrain_gpt.py --growth-plan")
    p.add_argument("--growth-plan", required=True)
    p.add_argument("--save", default=None, help="run directory")
    a = p.parse_args(argv)
    try:
        run(a.growth_plan, a.save)
    except (PlanError, CheckpointError) as e:
        _fail(str(e))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if any(arg == "--growth-plan" or arg.startswith("--growth-plan=") for arg in argv):
        return _run_plan(argv)
    from megagrow.runtime.ranks import discover_ranks
    discover_ranks()  # ranks started by srun directly
    try:
        args = parse_args(argv)
    except (ArgumentError, CheckpointError) as e:
        _fail(str(e))
    from megagrow.runtime.distributed import destroy
    from megagrow.training.pretrain import pretrain
    try:
        pretrain(args)
    except CheckpointError as e:
        _fail(str(e))
    finally:
        destroy()
