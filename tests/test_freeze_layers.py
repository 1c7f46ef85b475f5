"""--freeze-layers and LLaMA-Pro's block expansion in real torchrun jobs (DP=2): a 2-layer model trained, grown
with `zero` into 4 layers (1 Z1 2 Z2) and trained with only the new blocks (a plan's `trainable: new`), then with
only the old ones; frozen layers stay bit-identical with their optimizer state kept, the others, the embeddings and
the output layer train, with and without the distributed optimizer."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

from conftest import ROOT, tiny_args, pretrain_job

from megagrow.checkpoint.io import open_checkpoint
from megagrow.scheduling.plan import Plan, Stage, dump_plan

# tiny_args' model
TARGET = {"num_layers": 4, "hidden_size": 64, "num_attention_heads": 4, "group_query_attention": True,
          "num_query_groups": 2, "swiglu": True, "normalization": "RMSNorm", "position_embedding_type": "rope",
          "untie_embeddings_and_output_weights": True, "hidden_dropout": 0.0, "attention_dropout": 0.0}
OLD, NEW = [1, 3], [2, 4]  # zero's 1 Z1 2 Z2


def write_plan(data_dir, path, trainable="new", distributed=True) -> str:
    """Stage 0: 2 layers for 2 iterations; stage 1: grown with zero, 10 iterations with `trainable`."""
    training = {"global_batch_size": 8, "micro_batch_size": 2, "seq_length": 64, "lr": 3e-3, "lr_warmup_iters": 1,
                "log_interval": 1, "eval_interval": 1000, "eval_iters": 1, "seed": 1234,
                "use_distributed_optimizer": distributed}
    data = {"data_path": f"{data_dir}/corpus_text_document", "tokenizer_type": "GPTSentencePieceTokenizer",
            "tokenizer_model": f"{data_dir}/tok.model", "split": "90,5,5", "data_cache_path": f"{data_dir}/cache"}
    stages = [Stage("2l", model={"num_layers": 2}, stop={"policy": "iters", "iteration": 2}, parallel={"nproc": 2}),
              Stage("4l", grow={"op": "zero"}, stop={"policy": "flops"}, parallel={"nproc": 2}, trainable=trainable)]
    plan = Plan(TARGET, {}, training, data, stages, vocab_size=1024)
    plan.budget = {"flops": 2 * plan.step_flops(stages[0]) + 10.5 * plan.step_flops()}
    with open(path, "w") as f:
        f.write(dump_plan(plan))
    return str(path)


def layers(path) -> list[dict]:
    """Every layer of the checkpoint at `path`: {state: {name: tensor}}, model and optimizer states."""
    view = open_checkpoint(str(path))
    try:
        return [view.read_layer(i) for i in range(view.num_layers)] + [view.read_globals()]
    finally:
        view.close()


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def moved(a: dict, b: dict) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def expanded(data_dir, tmp_path_factory):
    """The staged run: {small: stage 0's checkpoint, grown: the grown one, trained: stage 1's last, log, metrics}."""
    d = tmp_path_factory.mktemp("expansion")
    run = d / "run"
    out = subprocess.run([sys.executable, "-m", "megagrow.cli", "run", write_plan(data_dir, d / "plan.yaml"),
                          "--output", str(run), "--quiet"], cwd=ROOT, capture_output=True, text=True, timeout=400,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    stage1 = run / "stage1_4l"
    log = (stage1 / "log.txt").read_text() if (stage1 / "log.txt").exists() else ""
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:] + log[-3000:]
    metrics = [json.loads(line) for line in open(stage1 / "metrics.jsonl")]
    return {"small": run / "stage0_2l" / "ckpt", "grown": stage1 / "ckpt" / "iter_0000002",
            "trained": stage1 / "ckpt", "log": log, "losses": {r["iteration"]: r["lm loss"] for r in metrics
                                                               if r["kind"] == "train"}}


def test_block_expansion_trains_only_the_new_blocks(expanded):
    """`trainable: new` after zero growth: the old blocks, moments and fp32 copies included, are the small model's
    bit for bit after 10 iterations; the new blocks, the embeddings and the output layer trained."""
    assert " frozen layers (--freeze-layers): 1,3; " in expanded["log"]
    small, grown, trained = layers(expanded["small"]), layers(expanded["grown"]), layers(expanded["trained"])
    assert sorted(expanded["losses"]) == list(range(3, 13))
    for new, old in zip(OLD, (1, 2)):
        assert sorted(trained[new - 1]) == ["exp_avg", "exp_avg_sq", "model", "param"]
        for state in trained[new - 1]:
            assert same(trained[new - 1][state], small[old - 1][state]), (new, state)
    for n in NEW:
        assert moved(trained[n - 1]["model"], grown[n - 1]["model"]), n
    assert moved(trained[-1]["model"], grown[-1]["model"])  # embeddings, final norm, output layer
    losses = expanded["losses"]
    assert losses[12] < losses[3], losses


def _train(data_dir, tmp_path, load, frozen: str, extra: dict) -> tuple:
    """10 iterations from `load` (copied) with --freeze-layers `frozen`: (start's layers, saved layers, run)."""
    start = tmp_path / "ckpt"
    shutil.copytree(load, start)
    before = layers(start)
    run = pretrain_job(2, tiny_args(data_dir, **{"--load": str(start), "--save": str(start), "--freeze-layers": frozen,
                                             "--eval-iters": "0", **extra}), tmp_path / "m.jsonl")
    assert run.returncode == 0, run.output[-3000:]
    return before, layers(start), run


@pytest.mark.parametrize("optimizer", ["plain", "distributed"])
def test_frozen_layers_stay_bit_identical_and_keep_their_optimizer_state(data_dir, expanded, tmp_path, optimizer):
    """--freeze-layers 2,4 for 10 iterations. Distributed: from the block expansion's checkpoint, where 1 and 3
    were frozen (they train again: their optimizer state loaded) and 2 and 4 trained; plain: from the grown model
    saved without optimizer state (LLaMA-Pro from a released model), so the frozen layers get zero moments."""
    if optimizer == "distributed":
        load, extra = expanded["trained"], {"--use-distributed-optimizer": "", "--train-iters": "22",
                                            "--override-opt_param-scheduler": ""}
        states = ["exp_avg", "exp_avg_sq", "model", "param"]
    else:
        from megagrow.growth.grow import grow
        load, extra, states = tmp_path / "grown", {"--train-iters": "12"}, ["exp_avg", "exp_avg_sq", "model"]
        grow(str(expanded["small"]), str(load), "zero", {"num_layers": 4}, with_optimizer=False, progress=False)
    before, after, run = _train(data_dir, tmp_path / "run", load, "2,4", extra)
    assert " frozen layers (--freeze-layers): 2,4; " in run.output
    for n in NEW:
        assert sorted(after[n - 1]) == states, n  # their optimizer state is in the checkpoint
        for state in before[n - 1]:
            assert same(after[n - 1][state], before[n - 1][state]), (n, state)
        if optimizer == "plain":
            assert not any(t.any() for state in ("exp_avg", "exp_avg_sq") for t in after[n - 1][state].values())
    for n in OLD:
        assert moved(after[n - 1]["model"], before[n - 1]["model"]), n
    assert moved(after[-1]["model"], before[-1]["model"])
    losses = run.losses()
    assert len(losses) == 10 and all(map(torch.isfinite, torch.tensor(list(losses.values()))))
    assert losses[max(losses)] < losses[min(losses)], losses


def test_a_plan_renders_trainable_as_freeze_layers(data_dir, tmp_path, capsys):
    """`trainable: new` freezes what the growth did not make, a list freezes the rest; `all` renders nothing."""
    from megagrow.cli import main
    for trainable, flag in (("new", "1,3"), ([1, 2, 3], "4"), ("all", None)):
        path = write_plan(data_dir, tmp_path / "plan.yaml", trainable)
        assert main(["run", path, "--output", str(tmp_path / "run"), "--dry-run"]) == 0
        launches = [line for line in capsys.readouterr().out.splitlines() if "pretrain_gpt.py" in line]
        assert len(launches) == 2 and "--freeze-layers" not in launches[0]
        assert (f"--freeze-layers {flag}" in launches[1]) if flag else "--freeze-layers" not in launches[1]
    assert "trainable" not in yaml.safe_load(open(path))["stages"][1]  # all: the default, not written
