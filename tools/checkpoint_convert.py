#!/usr/bin/env python3
"""Rewrite a Megatron checkpoint at another TP/PP and/or format (same as `megagrow checkpoint convert`).

  python tools/checkpoint_convert.py --load DIR --save DIR [--target-tp N] [--target-pp N]
      [--ckpt-format torch|torch_dist] [--no-optimizer] [--force]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megagrow.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["checkpoint", "convert", *sys.argv[1:]]))
