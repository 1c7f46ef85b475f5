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


def main(argv: list[str] | None = None) -> None:
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
