"""MixtureGrowth against one small model grown by fpi or direct, and against scratch, on one FLOPs budget.

    python bench/mixture_growth.py [--output runs/bench_mixture] [--tokens 6e5] [--small-share 0.3] [--quick]

Prepares the embedded corpus if absent, then runs (`megagrow run`) three plans of the same target and budget,
the first with the scratch baseline (the target alone on the whole budget):
- mixture: two models of half the width side by side (a pair stage, seeds 1234 and 1235, one process each)
  for `--small-share` of the budget, then `mixture` (the paper's orthogonal coefficients) into the target;
- fpi, direct: one model of half the width on the same share of the budget (so twice the iterations, seed
  1234, two processes), then grown by that operator.
Every run pays for what it trains (both small models, for mixture) and stops at the budget. Last line: JSON
with each run's validation loss at the budget, all of them read at the same FLOPs (the lowest final FLOPs
of the four, interpolated between evaluations), and each run's speed-up against scratch (analysis.report:
the ratio of FLOPs the two need to reach the same validation loss).
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megagrow.analysis.report import loss_at, speedup  # noqa: E402
from _staged import budget_parser, prepare, training  # noqa: E402
from megagrow.runs.directory import RunDir  # noqa: E402
from megagrow.scheduling.driver import run  # noqa: E402
from megagrow.scheduling.plan import Plan, Stage, describe, dump_plan  # noqa: E402

TARGET = {"num_layers": 4, "hidden_size": 128, "ffn_hidden_size": 512, "num_attention_heads": 4,
          "position_embedding_type": "rope", "normalization": "RMSNorm", "swiglu": False,
          "untie_embeddings_and_output_weights": True, "hidden_dropout": 0.0, "attention_dropout": 0.0}
SMALL = {"hidden_size": 64, "ffn_hidden_size": 256, "num_attention_heads": 2}  # half of every width


def make(op: str, training: dict, data: dict, vocab: int, tokens: float, share: float) -> Plan:
    plan = Plan(dict(TARGET), {}, dict(training), dict(data), [], vocab_size=vocab)
    small = Stage("small", model=dict(SMALL), parallel={"nproc": 2})
    budget = round(tokens / plan.tokens_per_iteration) * plan.step_flops()
    pair_iters = max(1, int(share * budget / (2 * plan.step_flops(small))))  # the same FLOPs either way
    if op.startswith("mixture"):
        small.pair, small.stop = {"seeds": [1234, 1235]}, {"policy": "iters", "iteration": pair_iters}
    else:
        small.stop = {"policy": "iters", "iteration": 2 * pair_iters}
    plan.stages = [small, Stage("target", grow={"op": op}, parallel={"nproc": 2})]
    plan.budget = {"flops": float(budget), "target_scratch_tokens": int(tokens)}
    plan.check()
    return plan


def curve(run_dir: str, plan: Plan) -> list[tuple[float, float]]:
    """(FLOPs, validation loss) through the run's stages (a pair stage: both models' FLOPs, their mean loss)."""
    stages = [RunDir(run_dir).stage(i, s.name) for i, s in enumerate(plan.stages)]
    return [(r["flops"], r["lm loss"]) for stage in stages for r in stage.metrics()["valid"]]


def main() -> None:
    p = budget_parser(__doc__, "runs/bench_mixture", 6e5)
    p.add_argument("--small-share", type=float, default=0.3, help="share of the budget the small model(s) train")
    a = p.parse_args()
    tokens, data, vocab = prepare(a)
    train = training(a.lr, 10, 5 if a.quick else 25, 1000)
    curves, plans = {}, {}
    for name, op in (("mixture", "mixture"), ("fpi", "fpi"), ("direct", "direct")):
        plan = plans[name] = make(op, train, data, vocab, tokens, a.small_share)
        print(f"== {name}\n{describe(plan)}", flush=True)
        path = os.path.join(a.output, f"{name}.yaml")
        with open(path, "w") as f:
            f.write(dump_plan(plan))
        run(path, os.path.join(a.output, name), baseline=name == "mixture")
        curves[name] = curve(os.path.join(a.output, name), plan)
    base = RunDir(os.path.join(a.output, "mixture")).baseline().metrics()["valid"]
    curves = {"scratch": [(r["flops"], r["lm loss"]) for r in base], **curves}
    common = min(c[-1][0] for c in curves.values())  # every run is read at the same FLOPs
    out = {"budget_flops": plans["mixture"].budget["flops"], "small_share": a.small_share, "common_flops": common}
    for name, c in curves.items():
        s = speedup(c, curves["scratch"])
        out[name] = {"final_flops": c[-1][0], "final_valid_loss": round(c[-1][1], 4),
                     "valid_loss_at_common_flops": round(loss_at(c, common), 4), "speedup": round(s["speedup"], 3)}
        print(f"{name:>8}: validation loss {c[-1][1]:.4f} after {c[-1][0]:.4g} FLOPs "
              f"({out[name]['valid_loss_at_common_flops']:.4f} at {common:.4g}), speed-up {s['speedup']:.2f}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
