"""`megagrow lag study`: the LAG paper's experiment on your data.

A study grows one trained checkpoint with every candidate (LAG's design space for L -> L', and/or a
list), trains each grown model to the end (N iterations, the same batches for all), and analyses how
well the loss after t iterations predicts the loss at the end (lag.analysis). It is a plan with two
stages, the checkpoint and the grown model, whose LAG probes run to the end: the same machinery as a
LAG selection in a staged run, resumable the same way.
"""

from __future__ import annotations

import os

from megagrow.checkpoint.io import open_checkpoint
from megagrow.lag.analysis import analyze_run
from megagrow.lag.probe import LagProbing
from megagrow.runs.directory import StageDir
from megagrow.scheduling.driver import Driver
from megagrow.scheduling.plan import Plan, Stage, dump_plan
from megagrow.scheduling.timing import PlanError
from megagrow.training.flags import from_args

_KEPT_TRAINING = ("global_batch_size", "micro_batch_size", "lr", "min_lr", "lr_decay_style", "lr_warmup_iters",
                  "weight_decay", "clip_grad", "seed", "optimizer", "adam_beta1", "adam_beta2", "adam_eps", "bf16")


def write_study_plan(load: str, num_layers: int, steps: int, out_dir: str, space: str | bool, candidates: list,
                     groups: int, nproc: int, eval_interval: int | None, time_limit: float | None) -> tuple[str, int]:
    view = open_checkpoint(load)
    a, iteration = view.args, view.iteration
    view.close()
    if num_layers <= a.num_layers:
        raise PlanError(f"--num-layers {num_layers} must exceed the checkpoint's {a.num_layers}")
    g = from_args(a)
    target = {**g.get("model", {}), "num_layers": num_layers}
    target.pop("seq_length", None)
    training = {k: v for k, v in {**g.get("training", {}), **g.get("logging", {})}.items() if k in _KEPT_TRAINING}
    training.update(seq_length=a.seq_length, eval_iters=a.eval_iters, log_interval=max(1, steps // 20),
                    eval_interval=eval_interval or max(1, steps // 20), global_batch_size=a.global_batch_size,
                    micro_batch_size=a.micro_batch_size)
    source = Stage(name=f"{a.num_layers}l", model={"num_layers": a.num_layers},
                   stop={"policy": "iters", "iteration": iteration}, parallel={"nproc": nproc})
    grown = Stage(name=f"{num_layers}l", grow={"select": "lag", "k": steps, "space": space, "candidates": candidates,
                                               "groups": groups, "time_limit": time_limit},
                  stop={"policy": "flops"}, lr={"schedule": "rewarm", "warmup_iters": a.lr_warmup_iters},
                  parallel={"nproc": nproc, "tensor_model_parallel_size": a.tensor_model_parallel_size,
                            "pipeline_model_parallel_size": a.pipeline_model_parallel_size})
    plan = Plan(target, {}, training, dict(g.get("data", {})), [source, grown],
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
    space = {"all": True, "dup": "dup", "none": False}[space]
    path, iteration = write_study_plan(load, num_layers, steps, out_dir, space, list(candidates), groups, nproc,
                                       eval_interval, time_limit)
    driver = Driver(path, out_dir)
    source, grown = driver.plan.stages
    previous = StageDir(out_dir, "source")
    previous.ckpt = os.path.abspath(load)
    where = StageDir(out_dir, "study").make()
    LagProbing(driver, source, grown, previous, where, iteration, driver.plan.shape(source).num_layers, num_layers,
               driver.plan.step_flops(grown), driver.plan.training.get("eval_interval")).run_probes()
    return analyze_run(where.dir)
