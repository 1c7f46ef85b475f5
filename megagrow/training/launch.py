"""Entry point of pretrain_gpt.py: validate flags first (no megatron-core import), then train.

A bad launch must fail in a second with one line on stderr, before any process group or heavy import;
the top-level handler (megagrow.entry) turns anything that escapes into one line and an exit code.
"""

from __future__ import annotations

import sys

from megagrow.entry import guarded


def _run_plan(argv: list[str]) -> None:
    """`pretrain_gpt.py --growth-plan PLAN [--save RUN_DIR]`: the staged-run driver (not under torchrun)."""
    import argparse
    from megagrow.scheduling.driver import run
    p = argparse.ArgumentParser(prog="pretrain_gpt.py --growth-plan")
    p.add_argument("--growth-plan", required=True)
    p.add_argument("--save", default=None, help="run directory")
    a = p.parse_args(argv)
    run(a.growth_plan, a.save)


def _main(argv: list[str]) -> None:
    if any(arg == "--growth-plan" or arg.startswith("--growth-plan=") for arg in argv):
        return _run_plan(argv)
    from megagrow.runtime.ranks import discover_ranks
    from megagrow.training.arguments import parse_args
    discover_ranks()  # ranks started by srun directly
    args = parse_args(argv)
    from megagrow.runtime.distributed import destroy
    from megagrow.training.pretrain import pretrain
    try:
        pretrain(args)
    finally:
        destroy()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    return guarded(lambda: _main(argv))
