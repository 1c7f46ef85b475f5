"""Megatron-LM's torch_dist save and load flags on a DP=2 distributed-optimizer run: the fully parallel save
(its default), --ckpt-fully-parallel-load and --dist-ckpt-strictness raise_all resume to the uninterrupted run's
losses; --no-save-optim and --no-save-rng leave those out of the checkpoint."""

import pytest

from conftest import tiny_args, pretrain_job

RUN = {"--train-iters": "6", "--use-distributed-optimizer": "", "--global-batch-size": "8"}


@pytest.mark.slow
def test_fully_parallel_save_and_load_resume_exactly(data_dir, tmp_path):
    whole = pretrain_job(2, tiny_args(data_dir, **RUN), tmp_path / "whole.jsonl")
    assert whole.returncode == 0, whole.output[-3000:]
    ck = tmp_path / "ck"
    first = pretrain_job(2, tiny_args(data_dir, **RUN, **{"--save": str(ck), "--exit-interval": "3"}),
                     tmp_path / "first.jsonl")
    assert first.returncode == 0, first.output[-3000:]
    rest = pretrain_job(2, tiny_args(data_dir, **RUN, **{"--load": str(ck)}) +
                    ["--ckpt-fully-parallel-load", "--dist-ckpt-strictness", "raise_all"], tmp_path / "rest.jsonl")
    assert rest.returncode == 0, rest.output[-3000:]
    assert {**first.losses(), **rest.losses()} == whole.losses()

    from megagrow.checkpoint.io import open_checkpoint
    lean = tmp_path / "lean"
    run = pretrain_job(2, tiny_args(data_dir, **{**RUN, "--train-iters": "2", "--save": str(lean)}) +
                   ["--no-save-optim", "--no-save-rng", "--no-ckpt-fully-parallel-save"], tmp_path / "lean.jsonl")
    assert run.returncode == 0, run.output[-3000:]
    view = open_checkpoint(str(lean))
    try:
        assert view.optimizer is None and "opt_param_scheduler" not in view.extra
    finally:
        view.close()
