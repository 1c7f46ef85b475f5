"""Pre-train a GPT model with megatron-core (Megatron-LM's entry point and flags).

    torchrun --nproc-per-node 2 pretrain_gpt.py --tensor-model-parallel-size 2 --num-layers 4 ...

The loop, model and checkpointing live in megagrow/; this file is the launcher Megatron users know.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from megagrow.training.launch import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
