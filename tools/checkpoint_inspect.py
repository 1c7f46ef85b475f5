#!/usr/bin/env python3
"""Describe a Megatron checkpoint and check it is complete (same as `megagrow checkpoint inspect`).

  python tools/checkpoint_inspect.py DIR [--json]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megagrow.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["checkpoint", "inspect", *sys.argv[1:]]))
