"""Megatron-LM's speed and memory flags change how a step is computed, not what it computes: sequence
parallelism, activation recomputation, overlapped gradient reduction and parameter gathering each train
to the plain run's losses (real torchrun/gloo jobs, 10 iterations)."""

import pytest

from conftest import tiny_args, pretrain_job

TEN = {"--train-iters": "10", "--eval-interval": "5", "--eval-iters": "1"}
TP2 = {**TEN, "--tensor-model-parallel-size": "2"}
DISTOPT = {**TEN, "--use-distributed-optimizer": ""}


def assert_same_losses(plain, other, rel: float = 1e-5):
    for kind in ("train", "valid"):
        a, b = plain.losses(kind), other.losses(kind)
        assert a.keys() == b.keys() and a, (kind, a, b)
        for it in a:
            assert abs(a[it] - b[it]) <= rel * abs(a[it]), (kind, it, a[it], b[it])


@pytest.mark.slow
@pytest.mark.parametrize("base,variants", [
    (TP2, {"sequence parallel": ["--sequence-parallel"],
           "full recompute": ["--recompute-granularity", "full", "--recompute-method", "uniform",
                              "--recompute-num-layers", "1"],
           "selective recompute": ["--recompute-activations"],
           "block recompute, sequence parallel": ["--sequence-parallel", "--recompute-granularity", "full",
                                                  "--recompute-method", "block", "--recompute-num-layers", "2"]}),
    (DISTOPT, {"overlapped reduce and gather": ["--overlap-grad-reduce", "--overlap-param-gather",
                                                "--ddp-bucket-size", "20000"]}),
], ids=["tp2", "distributed-optimizer"])
def test_same_losses_as_the_plain_run(data_dir, tmp_path, base, variants):
    plain = pretrain_job(2, tiny_args(data_dir, **base), tmp_path / "plain.jsonl")
    assert plain.returncode == 0, plain.output
    losses = plain.losses()
    assert len(losses) == 10 and losses[10] < losses[1]
    for name, flags in variants.items():
        run = pretrain_job(2, tiny_args(data_dir, **base) + flags, tmp_path / f"{name}.jsonl")
        assert run.returncode == 0, (name, run.output[-3000:])
        assert_same_losses(plain, run)
