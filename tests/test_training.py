"""Real megatron-core training in real torchrun/gloo jobs: layouts, resume, resharding, clipping, crashes."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, free_port, tiny_args, pretrain_job


def assert_close(a: dict, b: dict, rel: float = 1e-4):
    assert a.keys() == b.keys() and a
    for k in a:
        assert abs(a[k] - b[k]) <= rel * abs(a[k]), (k, a[k], b[k])


@pytest.mark.slow
def test_same_losses_across_layouts(data_dir, tmp_path):
    runs = {}
    for name, nproc, flags in [("tp1pp1", 1, {}), ("tp2", 2, {"--tensor-model-parallel-size": "2"}),
                               ("pp2", 2, {"--pipeline-model-parallel-size": "2"}), ("dp2", 2, {})]:
        # tp2 under torchrun itself: the launch users run gives the same losses as the tests' forked ranks
        run = pretrain_job(nproc, tiny_args(data_dir, **flags), tmp_path / f"{name}.jsonl", real=name == "tp2")
        assert run.returncode == 0, run.output
        runs[name] = run
    base = runs["tp1pp1"]
    assert len(base.losses()) == 4 and base.losses()[4] < base.losses()[1]  # it trains
    for name in ("tp2", "pp2", "dp2"):
        assert_close(base.losses(), runs[name].losses())
        assert_close(base.losses("valid"), runs[name].losses("valid"))


@pytest.mark.slow
def test_gpt2_tied_embeddings_across_pipeline_stages(data_dir, tmp_path):
    """GPT-2 family (LayerNorm, GeLU, learned positions, tied embeddings split across stages)."""
    gpt2 = {"--group-query-attention": None, "--num-query-groups": None, "--swiglu": None,
            "--normalization": None, "--position-embedding-type": None, "--untie-embeddings-and-output-weights": None}
    a = pretrain_job(1, tiny_args(data_dir, **gpt2), tmp_path / "a.jsonl")
    b = pretrain_job(2, tiny_args(data_dir, **gpt2, **{"--pipeline-model-parallel-size": "2"}), tmp_path / "b.jsonl")
    assert a.returncode == 0 and b.returncode == 0, a.output + b.output
    assert_close(a.losses(), b.losses())


@pytest.mark.slow
def test_resume_is_bit_identical_and_reshards(data_dir, tmp_path):
    dropout = {"--hidden-dropout": "0.1", "--attention-dropout": "0.1", "--tensor-model-parallel-size": "2",
               "--train-iters": "6", "--eval-interval": "3"}
    full = pretrain_job(2, tiny_args(data_dir, **dropout, **{"--save": str(tmp_path / "full")}), tmp_path / "full.jsonl")
    assert full.returncode == 0, full.output
    ck = str(tmp_path / "ck")
    first = pretrain_job(2, tiny_args(data_dir, **dropout, **{"--save": ck, "--exit-interval": "3"}), tmp_path / "r.jsonl")
    assert first.returncode == 0, first.output
    assert open(os.path.join(ck, "latest_checkpointed_iteration.txt")).read() == "3"
    second = pretrain_job(2, tiny_args(data_dir, **dropout, **{"--save": ck, "--load": ck}), tmp_path / "r.jsonl")
    assert second.returncode == 0, second.output
    assert "loaded checkpoint" in second.output
    assert second.losses() == full.losses()  # exact float equality, iterations 1..6
    assert second.losses("valid") == full.losses("valid")

    # The TP=2 checkpoint loads at TP=1 (torch_dist resharding) and evaluates to the same loss.
    tp1 = pretrain_job(1, tiny_args(data_dir, **{**dropout, "--tensor-model-parallel-size": "1", "--load": ck}),
                   tmp_path / "tp1.jsonl")
    assert tp1.returncode == 0, tp1.output
    assert not tp1.losses()  # nothing left to train
    assert abs(tp1.losses("valid")[6] - full.losses("valid")[6]) <= 1e-4 * full.losses("valid")[6]


def _load_weights(path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    out = path + ".pt"
    dcp_to_torch_save(path, out)
    return {k: v for k, v in torch.load(out, weights_only=False).items()
            if isinstance(v, torch.Tensor) and v.is_floating_point() and "_extra_state" not in k
            and not k.startswith("optimizer")}


@pytest.mark.slow
def test_clip_grad_clips_on_cpu(data_dir, tmp_path):
    """One SGD step with --clip-grad c moves the (TP-sharded) parameters by exactly lr * c."""
    sgd = {"--optimizer": "sgd", "--weight-decay": "0", "--lr-decay-style": "constant", "--lr-warmup-iters": "0",
           "--train-iters": "1", "--tensor-model-parallel-size": "2", "--eval-iters": "0"}
    start = pretrain_job(2, tiny_args(data_dir, **sgd, **{"--lr": "0", "--save": str(tmp_path / "a")}), tmp_path / "a.jsonl")
    step = pretrain_job(2, tiny_args(data_dir, **sgd, **{"--lr": "1.0", "--clip-grad": "0.01", "--save": str(tmp_path / "b")}),
                    tmp_path / "b.jsonl")
    assert start.returncode == 0 and step.returncode == 0, start.output + step.output
    grad_norm = step.metrics[0]["grad_norm"]
    assert grad_norm > 0.1  # well above the clip threshold, so clipping must act
    a, b = _load_weights(str(tmp_path / "a/iter_0000001")), _load_weights(str(tmp_path / "b/iter_0000001"))
    assert len(a) > 5 and a.keys() == b.keys()
    moved = torch.sqrt(sum(((b[k].double() - a[k].double()) ** 2).sum() for k in a))
    assert abs(moved.item() - 0.01) < 1e-4, (moved.item(), grad_norm)


def _kill_tree(pid):
    """SIGKILL torchrun and its workers at once (they run in their own sessions), like a node failure."""
    import psutil
    procs = [psutil.Process(pid)] + psutil.Process(pid).children(recursive=True)
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)


def _tracker(root):
    return open(os.path.join(root, "latest_checkpointed_iteration.txt")).read()


@pytest.mark.slow
def test_sigkill_during_save_keeps_previous_checkpoint(data_dir, tmp_path):
    ck = str(tmp_path / "ck")
    argv = tiny_args(data_dir, **{"--train-iters": "1000", "--save": ck, "--save-interval": "2",
                                  "--hidden-size": "256", "--num-attention-heads": "8", "--num-query-groups": "4"})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "pretrain_gpt.py", "--tensor-model-parallel-size", "2", *argv]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    in_flight = os.path.join(ck, "iter_0000004.tmp")
    deadline = time.time() + 240
    try:
        while not os.path.isdir(in_flight):  # the second save has begun (ranks write into it next)
            assert time.time() < deadline and proc.poll() is None, "second save never started"
            time.sleep(0.002)
        _kill_tree(proc.pid)
        proc.wait()
    finally:
        if proc.poll() is None:
            _kill_tree(proc.pid)
    assert _tracker(ck) == "2" and os.path.isdir(in_flight)  # killed mid-save, previous one still current
    assert not os.path.exists(os.path.join(ck, "iter_0000004"))
    resumed = pretrain_job(2, ["--tensor-model-parallel-size", "2", *tiny_args(
        data_dir, **{"--train-iters": "4", "--save": ck, "--load": ck, "--hidden-size": "256",
                     "--num-attention-heads": "8", "--num-query-groups": "4"})], tmp_path / "m.jsonl")
    assert resumed.returncode == 0, resumed.output
    assert "loaded checkpoint" in resumed.output and sorted(resumed.losses()) == [3, 4]
    assert _tracker(ck) == "4" and not os.path.exists(in_flight)
