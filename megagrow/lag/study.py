"""`megagrow lag study`: the LAG paper's experiment on your data, and `megagrow lag analyze` for any run.

A study grows one trained checkpoint with every candidate (LAG's design space for L -> L', and/or a
list), trains each grown model to the end (N iterations, the same batches for all), and analyses how
well the loss after t iterations predicts the loss at the end (lag.analysis). It is a plan with two
stages, the checkpoint and the grown model, whose LAG probes run to the end: the same machinery as
`lag:k=K` in a staged run, resumable the same way.
"""

from __future__ import annotations

import glob
import os

from megagrow.checkpoint.io import open_checkpoint
from megagrow.lag.analysis import analyze, load_probe_results
from megagrow.scheduling.timing import PlanError


def flags_from_args(args) -> dict[str, dict]:
    """A checkpoint's args as plan dicts (target model, training, data), keyed by Megatron-LM flag name."""
    from megagrow.training.arguments import build_parser
    parser = build_parser()
    groups = {}
    for group in parser._action_groups:
        for action in group._group_actions:
            if not action.option_strings or not hasattr(args, action.dest):
                continue
            value = getattr(args, action.dest)
            key = action.option_strings[0][2:].replace("-", "_")
            if isinstance(action.const, bool) and action.nargs == 0:  # store_true / store_false flags
                value = value == action.const or None
            if value is not None and value != action.default:
                groups.setdefault(group.title, {})[key] = value
    return groups


def write_study_plan(load: str, num_layers: int, steps: int, out_dir: str, space: str | bool, candidates: list,
                     groups: int, nproc: int, eval_interval: int | None, time_limit: float | None) -> tuple[str, int]:
    view = open_checkpoint(load)
    a, iteration = view.args, view.iteration
    view.close()
    if num_layers <= a.num_layers:
        raise PlanError(f"--num-layers {num_layers} must exceed the checkpoint's {a.num_layers}")
    g = flags_from_args(a)
    target = {**g.get("model", {}), "num_layers": num_layers}
    target.pop("seq_length", None)
    keep = ("global_batch_size", "micro_batch_size", "lr", "min_lr", "lr_decay_style", "lr_warmup_iters",
            "weight_decay", "clip_grad", "seed", "optimizer", "adam_beta1", "adam_beta2", "adam_eps", "bf16")
    training = {k: v for k, v in {**g.get("training", {}), **g.get("logging", {})}.items() if k in keep}
    training.update(seq_length=a.seq_length, eval_iters=a.eval_iters, log_interval=max(1, steps // 20),
                    eval_interval=eval_interval or max(1, steps // 20), global_batch_size=a.global_batch_size,
                    micro_batch_size=a.micro_batch_size)
    data = {k: v for k, v in g.get("data", {}).items()}
    source = {"name": f"{a.num_layers}l", "model": {"num_layers": a.num_layers},
              "stop": {"policy": "iters", "iteration": iteration}, "parallel": {"nproc": nproc}}
    grown = {"name": f"{num_layers}l", "grow": {"op": f"lag:k={steps}", "space": space, "candidates": candidates,
                                                "groups": groups, "time_limit": time_limit},
             "stop": {"policy": "flops"}, "lr": {"schedule": "rewarm", "warmup_iters": a.lr_warmup_iters},
             "parallel": {"nproc": nproc, "tensor_model_parallel_size": a.tensor_model_parallel_size,
                          "pipeline_model_parallel_size": a.pipeline_model_parallel_size}}
    from megagrow.scheduling.plan import Plan, Stage, dump_plan
    plan = Plan(target, {}, training, data, [Stage(**source), Stage(**grown)],
                vocab_size=getattr(a, "tokenizer_vocab_size", a.padded_vocab_size))
    # The budget ends the probes' LR schedule exactly `steps` after the growth.
    plan.budget = {"flops": iteration * plan.step_flops(plan.stages[0]) + steps * plan.step_flops()}
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "plan.yaml")
    with open(path, "w") as f:
        f.write(dump_plan(plan))
    return path, iteration


def study(load: str, num_layers: int, steps: int, out_dir: str, space="all", candidates=(), groups: int = 1,
          nproc: int = 1, eval_interval: int | None = None, time_limit: float | None = None) -> dict:
    from megagrow.lag.probe import LagProbing
    from megagrow.scheduling.driver import Driver, StageRun
    space = {"all": True, "dup": "dup", "none": False}[space]
    path, iteration = write_study_plan(load, num_layers, steps, out_dir, space, list(candidates), groups, nproc,
                                       eval_interval, time_limit)
    driver = Driver(path, out_dir)
    source, grown = driver.plan.stages
    previous = StageRun(out_dir, "source")
    previous.ckpt = os.path.abspath(load)
    where = StageRun(out_dir, "study")
    os.makedirs(where.dir, exist_ok=True)
    LagProbing(driver, source, grown, previous, where, iteration).run_probes()
    return analyze_dir(where.dir)


def lag_dirs(run_dir: str) -> list[str]:
    if os.path.basename(os.path.normpath(run_dir)) == "lag":
        return [run_dir]
    found = sorted(glob.glob(os.path.join(run_dir, "*", "lag")) + glob.glob(os.path.join(run_dir, "lag")))
    if not found:
        raise PlanError(f"{run_dir}: no LAG probes here (expected */lag/*/result.json)")
    return found


def analyze_dir(run_dir: str) -> dict:
    """Analyse every LAG of a run (or a study); figures and JSON go next to the probes, in analysis/."""
    out = {}
    for lag in lag_dirs(run_dir):
        curves, finals = load_probe_results(lag)
        target = os.path.join(os.path.dirname(lag), "analysis")
        out[lag] = analyze(curves, finals, target, tensorboard_dir=os.path.join(target, "tb"))
    return out
