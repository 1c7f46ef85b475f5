"""After --load, the optimizer trains with the run's own flags when it should (a stage boundary, a restarted
schedule, --override-opt_param-scheduler), and with the checkpoint's under --use-checkpoint-opt_param-scheduler.

The learning rate each iteration logs is compared, exactly, with megatron-core's scheduler built from the
flags that should be in effect; the param-group values are the `optimizer` record the trainer writes."""

from __future__ import annotations

import glob
import json
import os
import shlex
import subprocess
import sys

import pytest
import torch
import yaml

from conftest import ROOT, tiny_args, pretrain_job

FIRST = {"--train-iters": "8", "--exit-interval": "4", "--min-lr": "3e-4", "--lr-decay-style": "cosine"}
GBS = 8


def expected_lrs(argv: list[str], iterations: list[int], start: int) -> list[float]:
    """The LR megatron-core's scheduler gives after each of `iterations`, built from `argv` and stepped
    from `start` (the iteration its schedule counts from: 0, or the restart point)."""
    from megagrow.training.arguments import parse_args
    from megagrow.training.pretrain import _scheduler
    if "--load" in argv:  # the schedule is the flags' alone
        argv = argv[:argv.index("--load")] + argv[argv.index("--load") + 2:]
    args = parse_args(argv, world_size=1)
    sched = _scheduler(args, torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0))
    group = {}  # no per-group max_lr/min_lr: the scheduler's own, from the flags
    out, at = [], start
    for it in iterations:
        sched.step((it - at) * GBS)
        at = it
        out.append(sched.get_lr(group))
    return out


def records(path, kind):
    return [r for r in map(json.loads, open(path)) if r["kind"] == kind]


@pytest.fixture(scope="module")
def first_stage(data_dir, tmp_path_factory):
    """Iterations 1-4 of an 8-iteration cosine schedule (lr 3e-3, min 3e-4, wd 0.01, beta2 0.999)."""
    d = tmp_path_factory.mktemp("first")
    run = pretrain_job(1, tiny_args(data_dir, **FIRST, **{"--save": str(d / "ckpt")}), d / "metrics.jsonl")
    assert run.returncode == 0, run.output
    return d / "ckpt"


CASES = {  # second run's flags, its schedule's start (None: continues), the group values it must hold
    "lr_continue": (["--override-opt_param-scheduler", "--lr", "1e-2"], None, {"max_lr": 1e-2}),
    "lr_rewarm": (["--restart-lr-schedule-at", "4", "--lr", "1e-2", "--lr-warmup-iters", "2",
                   "--lr-decay-iters", "4"], 4, {"max_lr": 1e-2}),
    "lr_constant": (["--restart-lr-schedule-at", "4", "--lr", "1e-2", "--lr-decay-style", "constant",
                     "--lr-warmup-iters", "0"], 4, {"max_lr": 1e-2}),
    "min_lr": (["--override-opt_param-scheduler", "--min-lr", "1e-3"], None, {"min_lr": 1e-3}),
    "weight_decay": (["--override-opt_param-scheduler", "--weight-decay", "0.1"], None, {"weight_decay": 0.1}),
    "adam_beta2": (["--override-opt_param-scheduler", "--adam-beta2", "0.95"], None, {"betas": [0.9, 0.95]}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_runs_flags_win(data_dir, first_stage, tmp_path, case):
    extra, start, held = CASES[case]
    argv = tiny_args(data_dir, **{**FIRST, "--exit-interval": "6", "--load": str(first_stage),
                                           "--save": str(tmp_path / "ckpt")}) + extra
    run = pretrain_job(1, argv, tmp_path / "metrics.jsonl")
    assert run.returncode == 0, run.output
    logged = {r["iteration"]: r["lr"] for r in records(tmp_path / "metrics.jsonl", "train")}
    assert sorted(logged) == [5, 6]
    assert [logged[5], logged[6]] == expected_lrs(argv, [5, 6], start or 0)
    (optimizer,) = records(tmp_path / "metrics.jsonl", "optimizer")
    for key, value in held.items():
        got = max(optimizer[key]) if key == "weight_decay" else optimizer[key]
        assert got == pytest.approx(value, rel=0, abs=0), (key, optimizer)


def test_use_checkpoint_keeps_the_checkpoints_values(data_dir, first_stage, tmp_path):
    changed = ["--lr", "1e-2", "--min-lr", "1e-3", "--weight-decay", "0.1", "--adam-beta2", "0.95"]
    argv = tiny_args(data_dir, **{**FIRST, "--exit-interval": "6", "--load": str(first_stage),
                                           "--save": str(tmp_path / "ckpt")})
    run = pretrain_job(1, argv + ["--use-checkpoint-opt_param-scheduler"] + changed, tmp_path / "metrics.jsonl")
    assert run.returncode == 0, run.output
    logged = {r["iteration"]: r["lr"] for r in records(tmp_path / "metrics.jsonl", "train")}
    assert [logged[5], logged[6]] == expected_lrs(argv, [5, 6], 0)  # the first run's schedule
    (optimizer,) = records(tmp_path / "metrics.jsonl", "optimizer")
    assert (optimizer["max_lr"], optimizer["min_lr"], max(optimizer["weight_decay"]), optimizer["betas"]) == \
        (3e-3, 3e-4, 0.01, [0.9, 0.999])


def test_each_stage_of_a_staged_run_trains_with_its_own_flags(data_dir, tmp_path):
    """Four stages, three boundaries: re-warm with a new peak, floor, weight decay and beta2; a constant LR;
    continue with another peak. At each stage's first iterations the logged LR is its own flags' schedule."""
    from megagrow.scheduling.plan import Plan, Stage
    target = {"num_layers": 8, "hidden_size": 64, "num_attention_heads": 4, "group_query_attention": True,
              "num_query_groups": 2, "swiglu": True, "normalization": "RMSNorm", "position_embedding_type": "rope",
              "untie_embeddings_and_output_weights": True, "hidden_dropout": 0.0, "attention_dropout": 0.0}
    training = {"global_batch_size": GBS, "micro_batch_size": 2, "seq_length": 64, "lr": 3e-3, "min_lr": 3e-4,
                "lr_decay_style": "cosine", "lr_warmup_iters": 1, "log_interval": 1, "eval_interval": 1000,
                "eval_iters": 1, "seed": 1234}
    data = {"data_path": f"{data_dir}/corpus_text_document", "tokenizer_type": "GPTSentencePieceTokenizer",
            "tokenizer_model": f"{data_dir}/tok.model", "split": "90,5,5", "data_cache_path": f"{data_dir}/cache"}
    wanted = [{"lr": 1e-2, "min_lr": 1e-3, "weight_decay": 0.05, "adam_beta2": 0.95}, {"lr": 5e-3},
              {"lr": 4e-3, "weight_decay": 0.02}]
    stages = [Stage("1l", model={"num_layers": 1}, stop={"policy": "iters", "iteration": 2}),
              Stage("2l", model={"num_layers": 2}, grow={"op": "stack:g=2"}, stop={"policy": "iters", "iteration": 4},
                    lr={"schedule": "rewarm", "warmup_iters": 1}, training=wanted[0]),
              Stage("4l", model={"num_layers": 4}, grow={"op": "stack:g=2"}, stop={"policy": "iters", "iteration": 6},
                    lr={"schedule": "constant"}, training=wanted[1]),
              Stage("8l", grow={"op": "stack:g=2"}, stop={"policy": "flops"}, training=wanted[2])]
    plan = Plan(target, {}, training, data, stages, vocab_size=1024)
    plan.budget = {"flops": sum(2 * plan.step_flops(s) for s in stages) + plan.step_flops(stages[-1])}
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump({**{k: v for k, v in vars(plan).items() if k != "stages"},
                                    "stages": [vars(s) for s in stages]}))
    out = subprocess.run([sys.executable, "-m", "megagrow.cli", "run", str(path), "--output", str(tmp_path / "run"),
                          "--quiet"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    counted_from = 0
    for i, (stage, values) in enumerate(zip(stages[1:], wanted), 1):
        (where,) = glob.glob(str(tmp_path / "run" / f"stage{i}_*"))
        log = open(os.path.join(where, "log.txt")).readline()
        words = shlex.split(log[2:])
        argv = words[next(i for i, w in enumerate(words) if w.endswith("pretrain_gpt.py")) + 1:]
        metrics = os.path.join(where, "metrics.jsonl")
        begin = 2 * i
        logged = {r["iteration"]: r["lr"] for r in records(metrics, "train")}
        if stage.lr["schedule"] != "continue":
            counted_from = begin  # a restarted schedule counts from here; a continued one from the last restart
        assert [logged[begin + 1], logged[begin + 2]] == expected_lrs(argv, [begin + 1, begin + 2],
                                                                      counted_from), stage.name
        (optimizer,) = records(metrics, "optimizer")
        assert optimizer["max_lr"] == values["lr"] and optimizer["min_lr"] == values.get("min_lr", 3e-4)
        assert max(optimizer["weight_decay"]) == values.get("weight_decay", 0.01)
        assert optimizer["betas"] == [0.9, values.get("adam_beta2", 0.999)]
        decision = json.load(open(os.path.join(where, "decision.json")))
        assert decision["optimizer_at_start"] == {k: v for k, v in optimizer.items()
                                                  if k not in ("kind", "iteration", "flops")}
