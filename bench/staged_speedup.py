"""Staged G_stack training against training the target from scratch, on the same FLOPs budget.

    python bench/staged_speedup.py [--output runs/bench_staged] [--tokens 2e6] [--quick]

Prepares the embedded corpus if absent, writes a plan (`megagrow plan`: the small model at L/g layers
for the G_stack formula's tokens, clamped, then stack:g into the target), runs it and a scratch run
of the target with `megagrow run --baseline`, and prints the speed-up: the ratio of FLOPs the two
runs need to reach the same validation loss (analysis.report). Last line: JSON with `speedup`,
both runs' FLOPs and final validation losses.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _staged import budget_parser, prepare, training  # noqa: E402
from megagrow.scheduling.driver import run  # noqa: E402
from megagrow.scheduling.plan import describe, dump_plan, make_plan  # noqa: E402

TARGET = {"num_layers": 8, "hidden_size": 128, "ffn_hidden_size": 512, "num_attention_heads": 4,
          "position_embedding_type": "rope", "normalization": "RMSNorm", "swiglu": False,
          "untie_embeddings_and_output_weights": True, "hidden_dropout": 0.0, "attention_dropout": 0.0}


def main() -> None:
    p = budget_parser(__doc__, "runs/bench_staged", 2e6)
    p.add_argument("--growth-factor", type=int, default=4)
    p.add_argument("--small-fraction", type=float, default=0.5, help="clamp of the formula's small-model tokens")
    a = p.parse_args()
    tokens, data, vocab = prepare(a)
    plan = make_plan(TARGET, vocab, training(a.lr, 20, 25, 200), data, tokens=tokens,
                     growth_factor=a.growth_factor, max_small_fraction=a.small_fraction,
                     parallel={"nproc": 2})
    print(describe(plan), flush=True)
    path = os.path.join(a.output, "plan.yaml")
    with open(path, "w") as f:
        f.write(dump_plan(plan))
    s = run(path, os.path.join(a.output, "run"), baseline=True)
    print(f"speed-up: {s['speedup']:.2f} (to validation loss {s['common_loss']:.4f}: staged "
          f"{s['staged_flops_to_common_loss']:.4g} FLOPs, scratch {s['baseline_flops_to_common_loss'] or 0:.4g})")
    print(json.dumps({k: s[k] for k in ("speedup", "staged_flops", "baseline_flops", "staged_final_valid_loss",
                                         "baseline_final_valid_loss", "common_loss")}))


if __name__ == "__main__":
    main()
