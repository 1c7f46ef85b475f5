"""Virtual pipeline stages (Megatron-LM's interleaved 1F1B): PP=2 with 2 model chunks per rank trains to the
plain PP=2 run's losses, saves torch_dist as Megatron-LM does (model0, model1), resumes, converts to plain PP
and back with identical logits, and grows function-preservingly into another virtual-pipeline layout."""

import pytest
import torch

from conftest import tiny_args, pretrain_job
from test_checkpoint import logits, megagrow
from test_speed_flags import assert_same_losses

PP2 = {"--train-iters": "10", "--eval-interval": "5", "--eval-iters": "1", "--pipeline-model-parallel-size": "2"}
VPP2 = ["--num-virtual-stages-per-pipeline-rank", "2"]


@pytest.mark.slow
def test_interleaved_schedule_trains_saves_converts_and_grows(data_dir, tmp_path):
    plain = pretrain_job(2, tiny_args(data_dir, **PP2), tmp_path / "plain.jsonl")
    assert plain.returncode == 0, plain.output[-3000:]
    ck = tmp_path / "vpp"
    vpp = pretrain_job(2, tiny_args(data_dir, **PP2, **{"--save": str(ck), "--save-interval": "5"}) + VPP2,
                   tmp_path / "vpp.jsonl")
    assert vpp.returncode == 0, vpp.output[-3000:]
    assert_same_losses(plain, vpp)

    # Resumed from its iteration-5 checkpoint with the same layout: the same last five iterations.
    (ck / "latest_checkpointed_iteration.txt").write_text("5")
    resumed = pretrain_job(2, tiny_args(data_dir, **PP2, **{"--load": str(ck)}) + VPP2, tmp_path / "resumed.jsonl")
    assert resumed.returncode == 0, resumed.output[-3000:]
    assert {it: v for it, v in vpp.losses().items() if it > 5} == resumed.losses()
    (ck / "latest_checkpointed_iteration.txt").write_text("10")

    reference = logits(ck, 2, tmp_path)
    plain_pp = tmp_path / "plain_pp4"
    megagrow("checkpoint", "convert", "--load", str(ck), "--save", str(plain_pp), "--target-pp", "4", "--quiet")
    back = tmp_path / "back"
    megagrow("checkpoint", "convert", "--load", str(plain_pp), "--save", str(back), "--target-pp", "2",
             "--target-vpp", "2", "--rechunk", "--quiet")
    for root, nproc in ((plain_pp, 4), (back, 2)):
        assert torch.equal(logits(root, nproc, tmp_path), reference), root

    grown = tmp_path / "grown"
    megagrow("checkpoint", "grow", "--load", str(ck), "--save", str(grown), "--op", "zero", "--num-layers", "8",
             "--target-vpp", "4", "--quiet")
    assert (logits(grown, 2, tmp_path) - reference).abs().max().item() <= 1e-5
    more = {**PP2, "--load": str(grown), "--num-layers": "8", "--train-iters": "12"}
    resumed = pretrain_job(2, tiny_args(data_dir, **more) + ["--num-virtual-stages-per-pipeline-rank", "4"],
                       tmp_path / "grown.jsonl")
    assert resumed.returncode == 0, resumed.output[-3000:]
    assert sorted(resumed.losses()) == [11, 12]


def test_virtual_pipeline_needs_a_pipeline(data_dir):
    from megagrow.training.arguments import ArgumentError, parse_args
    with pytest.raises(ArgumentError, match="a virtual pipeline needs --pipeline-model-parallel-size 2 or more"):
        parse_args(tiny_args(data_dir) + VPP2, world_size=1)
    with pytest.raises(ArgumentError, match="does not divide the 2 layers of a pipeline stage"):
        parse_args(tiny_args(data_dir, **{"--pipeline-model-parallel-size": "2"}) +
                   ["--num-virtual-stages-per-pipeline-rank", "3"], world_size=2)
