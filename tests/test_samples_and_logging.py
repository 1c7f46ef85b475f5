"""Megatron-LM's sample-counted runs (--train-samples, --lr-*-samples, --lr-warmup-fraction, the batch ramp),
--decoupled-lr, --exit-duration-in-mins, and the logging and profiling flags, on real torchrun/gloo jobs."""

import glob
import json
import math
import time

import pytest
import torch

from conftest import tiny_args, pretrain_job

GBS = 8  # tiny_args' global batch
ITERS = {"--train-iters": "5", "--lr-warmup-iters": "1", "--lr-decay-iters": "5", "--lr-decay-style": "cosine",
         "--min-lr": "1e-4"}


def curve(run):
    return [(r["iteration"], r["lm loss"], r["lr"]) for r in run.metrics if r["kind"] == "train"]


@pytest.mark.slow
def test_samples_train_as_iterations_do(data_dir, tmp_path):
    """The same schedule said in samples, or as a warmup fraction, trains the same iterations bit for bit;
    --train-samples stops where Megatron-LM does (a last partial batch is not trained)."""
    by_iters = pretrain_job(1, tiny_args(data_dir, **ITERS), tmp_path / "iters.jsonl")
    assert by_iters.returncode == 0, by_iters.output[-3000:]
    in_samples = {**ITERS, "--train-iters": None, "--lr-warmup-iters": None, "--lr-decay-iters": None,
                  "--train-samples": str(5 * GBS + GBS - 1), "--lr-warmup-samples": str(GBS),
                  "--lr-decay-samples": str(5 * GBS)}
    fraction = {**ITERS, "--lr-warmup-iters": None, "--lr-warmup-fraction": "0.2"}
    runs = {name: pretrain_job(1, tiny_args(data_dir, **flags), tmp_path / f"{name}.jsonl")
            for name, flags in (("samples", in_samples), ("fraction", fraction))}
    for name, run in runs.items():
        assert run.returncode == 0, (name, run.output[-3000:])
        assert curve(run) == curve(by_iters), name
    assert [it for it, _, _ in curve(by_iters)] == [1, 2, 3, 4, 5]
    assert "training: 47 samples (5 iterations)" in runs["samples"].output


def test_ramp_matches_megatron_core_016():
    """The batch ramp is megatron-core 0.16's calculator's (0.19 dropped it): compared where it exists."""
    from argparse import Namespace
    from megagrow.training.schedule import global_batch_at, iterations_for_samples
    try:
        from megatron.core.num_microbatches_calculator import RampupBatchsizeNumMicroBatchesCalculator
    except ImportError:
        pytest.skip("this megatron-core has no batch ramp")
    for start, incr, ramp, gbs in ((2, 2, 8, 6), (16, 16, 5000, 1536), (4, 4, 333, 64)):
        args = Namespace(rampup_batch_size=[str(start), str(incr), str(ramp)], global_batch_size=gbs,
                         train_samples=3 * ramp)
        calc = RampupBatchsizeNumMicroBatchesCalculator(
            global_batch_size=gbs, micro_batch_size=1, data_parallel_size=1, decrease_batch_size_if_needed=False,
            rank=1, start_global_batch_size=start, batch_size_increment=incr, ramup_samples=ramp)
        for consumed in range(0, ramp + 2 * gbs, max(1, start // 2)):
            calc.update(consumed, consistency_check=False)
            assert global_batch_at(consumed, args) == calc.get_current_global_batch_size(), (start, consumed)
        assert iterations_for_samples(args) > 0


@pytest.mark.slow
def test_batch_ramp_and_decoupled_lr(data_dir, tmp_path):
    """--rampup-batch-size 2 2 8 to a batch of 6 over 30 samples: Megatron-LM's ramp (one increment per 4
    samples) gives batches 2, 2, 4, 6, then 6s to the last whole batch; samples and FLOPs count each.
    --decoupled-lr 0 freezes the embedding and output layer only, at the run's own LR schedule."""
    ramp = {"--train-iters": None, "--lr-warmup-iters": None, "--train-samples": "30", "--global-batch-size": "6"}
    run = pretrain_job(1, tiny_args(data_dir, **ramp) + ["--rampup-batch-size", "2", "2", "8"], tmp_path / "ramp.jsonl")
    assert run.returncode == 0, run.output[-3000:]
    train = [r for r in run.metrics if r["kind"] == "train"]
    assert [r["global_batch_size"] for r in train] == [2, 2, 4, 6, 6, 6]
    assert [r["consumed_samples"] for r in train] == [2, 4, 8, 14, 20, 26]
    flops = [r["flops"] for r in train]
    assert flops[2] - flops[1] == pytest.approx(2 * (flops[1] - flops[0]))

    from megagrow.checkpoint.io import open_checkpoint
    frozen = {"--train-iters": "3", "--decoupled-lr": "0", "--decoupled-min-lr": "0", "--save": str(tmp_path / "d")}
    still = {"--train-iters": "1", "--lr": "0", "--min-lr": "0", "--lr-warmup-iters": "0",
             "--save": str(tmp_path / "s")}
    runs = {}
    for name, flags in (("decoupled", frozen), ("still", still)):
        runs[name] = pretrain_job(1, tiny_args(data_dir, **flags), tmp_path / f"{name}.jsonl")
        assert runs[name].returncode == 0, runs[name].output[-3000:]
    plain = pretrain_job(1, tiny_args(data_dir, **{"--train-iters": "3"}), tmp_path / "plain.jsonl")
    assert [lr for *_, lr in curve(runs["decoupled"])] == [lr for *_, lr in curve(plain)]
    views = {name: open_checkpoint(str(tmp_path / name[0])) for name in runs}
    try:
        for key in ("embedding.word_embeddings.weight", "output_layer.weight"):
            assert torch.equal(views["decoupled"].read_globals()["model"][key],
                               views["still"].read_globals()["model"][key]), key
        changed = views["decoupled"].read_layer(0)["model"], views["still"].read_layer(0)["model"]
        assert not torch.equal(changed[0]["mlp.linear_fc2.weight"], changed[1]["mlp.linear_fc2.weight"])
    finally:
        for v in views.values():
            v.close()


@pytest.mark.slow
def test_logging_and_profiling_flags(data_dir, tmp_path, monkeypatch):
    """TP=2 run with every logging flag: the log line's throughput, params norm (the saved model's own
    norm, each tensor once) and zero count; megatron-core's timers on stdout and in TensorBoard; a
    torch.profiler trace of the profiled steps; an offline W&B run."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    tb = tmp_path / "tb"
    flags = ["--log-throughput", "--log-params-norm", "--log-num-zeros-in-grad", "--timing-log-level", "2",
             "--log-timers-to-tensorboard", "--tensorboard-dir", str(tb), "--profile", "--use-pytorch-profiler",
             "--profile-step-start", "1", "--profile-step-end", "2", "--wandb-project", "megagrow-test",
             "--wandb-exp-name", "tiny", "--wandb-save-dir", str(tmp_path / "wandb"), "--save", str(tmp_path / "ck")]
    run = pretrain_job(2, tiny_args(data_dir, **{"--tensor-model-parallel-size": "2", "--train-iters": "3"}) + flags,
                   tmp_path / "m.jsonl")
    assert run.returncode == 0, run.output[-3000:]
    lines = [l for l in run.output.splitlines() if " iteration        3/       3 |" in l]
    assert lines and all(f in lines[0] for f in ("throughput per GPU (TFLOP/s/GPU):", "params norm:", "num zeros:"))
    assert "forward-backward" in run.output and "forward-compute" in run.output

    from megagrow.checkpoint.io import open_checkpoint
    view = open_checkpoint(str(tmp_path / "ck"))
    try:
        tensors = list(view.read_globals()["model"].values()) + [
            t for i in range(view.num_layers) for t in view.read_layer(i)["model"].values()]
    finally:
        view.close()
    norm = math.sqrt(sum(t.double().pow(2).sum().item() for t in tensors))
    last = [r for r in run.metrics if r["kind"] == "train"][-1]
    assert last["params_norm"] == pytest.approx(norm, rel=1e-6)
    assert isinstance(last["num_zeros"], (int, float)) and last["num_zeros"] >= 0

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tb)).Reload()
    assert {"forward-backward-time", "params-norm", "num-zeros", "throughput"} <= set(events.Tags()["scalars"])
    assert glob.glob(f"{tb}/*.pt.trace.json*"), "no torch.profiler trace"
    assert glob.glob(f"{tmp_path}/wandb/wandb/offline-run-*"), "no offline W&B run"


def test_exit_duration_is_agreed_on_every_rank():
    """--exit-duration-in-mins: the minutes since the earliest rank started, once past the limit (Megatron-LM:
    0 means no limit)."""
    from argparse import Namespace
    from megagrow.training.pretrain import _minutes_up
    store = torch.distributed.HashStore()
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        assert _minutes_up(Namespace(exit_duration_in_mins=1), time.time() - 90) == pytest.approx(1.5, abs=0.05)
        assert _minutes_up(Namespace(exit_duration_in_mins=1), time.time()) is None
        assert _minutes_up(Namespace(exit_duration_in_mins=0), time.time() - 90) is None
    finally:
        torch.distributed.destroy_process_group()
