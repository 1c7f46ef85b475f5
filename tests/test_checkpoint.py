"""Checkpoint conversion on real trainer checkpoints (dist_checkpointing and legacy torch format):
logits and optimizer state survive TP/PP/format changes; corrupt inputs fail cleanly."""

import json
import os
import shutil
import subprocess

import pytest
import torch

from conftest import megagrow_cli, ranks, tiny_args, pretrain_job
from megagrow.checkpoint.dcp_stream import read_common_state

# Vocabulary 1024 padded to a multiple of 384 x TP: 1536 at TP=2 and 4, 1152 at TP=1, so conversions re-pad.
LLAMA = {"--num-attention-heads": "8", "--num-query-groups": "4", "--train-iters": "6", "--exit-interval": "3",
         "--make-vocab-size-divisible-by": "384",
         "--tensor-model-parallel-size": "2", "--pipeline-model-parallel-size": "2"}
GPT2 = {"--group-query-attention": None, "--num-query-groups": None, "--swiglu": None, "--normalization": None,
        "--position-embedding-type": None, "--untie-embeddings-and-output-weights": None, "--train-iters": "6",
        "--exit-interval": "3", "--tensor-model-parallel-size": "2", "--pipeline-model-parallel-size": "2"}


def megagrow(*argv, check=True) -> subprocess.CompletedProcess:
    out = megagrow_cli(argv)
    if check and out.returncode != 0:
        raise AssertionError(f"megagrow {argv} failed:\n{out.stdout}\n{out.stderr}")
    return out


def logits(root, nproc, tmp_path) -> torch.Tensor:
    out = tmp_path / f"logits_{os.path.basename(str(root))}.pt"
    code, output = ranks(nproc, "tests/logits_worker.py", [str(root), str(out)])
    assert code == 0, output
    return torch.load(out)


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    """Trainer checkpoints at iteration 3 of 6, TP=2 PP=2: Llama in torch_dist, GPT-2 in the torch format."""
    d = tmp_path_factory.mktemp("trained")
    runs = {"llama": (LLAMA, {}), "llama_distopt": (LLAMA, {"--use-distributed-optimizer": ""}),
            "gpt2": (GPT2, {"--ckpt-format": "torch"})}
    for name, (family, extra) in runs.items():
        run = pretrain_job(4, tiny_args(data_dir, **family, **extra, **{"--save": str(d / name)}), d / f"{name}.jsonl")
        assert run.returncode == 0, run.output
    return d


@pytest.mark.slow
@pytest.mark.parametrize("family,formats", [("llama", ("torch_dist", "torch")), ("gpt2", ("torch_dist", "torch"))])
def test_convert_chain_keeps_logits(trained, tmp_path, family, formats):
    """TP=2 PP=2 -> TP=1 PP=4 -> TP=4 PP=1, changing format on the way: same logits in megatron-core GPTModels."""
    source = trained / family
    reference = logits(source, 4, tmp_path)
    step1, step2 = tmp_path / "tp1pp4", tmp_path / "tp4pp1"
    megagrow("checkpoint", "convert", "--load", str(source), "--save", str(step1), "--target-tp", "1",
             "--target-pp", "4", "--ckpt-format", formats[0])
    megagrow("checkpoint", "convert", "--load", str(step1), "--save", str(step2), "--target-tp", "4",
             "--target-pp", "1", "--ckpt-format", formats[1])
    for root in (step1, step2):
        info = json.loads(megagrow("checkpoint", "inspect", str(root), "--json").stdout)
        assert info["complete"] and info["iteration"] == 3 and info["optimizer"].startswith("plain adam")
        got = logits(root, 4, tmp_path)
        assert got.shape == reference.shape
        assert (got - reference).abs().max().item() <= 1e-6
    assert len(os.listdir(source)) == 2  # the source is untouched: iter_0000003 and the tracker


@pytest.mark.slow
def test_transformer_engine_key_names_in_torch_format(trained, tmp_path):
    """A torch-format checkpoint of the TE spec (norms fused into the next linear's keys) reads as the local one."""
    from megagrow.model.layout import fused_name, split_layer_key
    te = tmp_path / "te"
    shutil.copytree(trained / "gpt2", te)
    for shard in te.glob("iter_*/mp_rank_*/model_optim_rng.pt"):
        state = torch.load(shard, weights_only=False)
        renamed = {}
        for key, value in state["model"].items():
            split = split_layer_key(key)
            renamed[f"decoder.layers.{split[0]}.{fused_name(split[1])}" if split else key] = value
        state["model"], state["args"].transformer_impl = renamed, "transformer_engine"
        torch.save(state, shard)
    local, te_again = tmp_path / "local", tmp_path / "te_again"
    megagrow("checkpoint", "convert", "--load", str(te), "--save", str(local), "--ckpt-format", "torch_dist")
    assert (logits(local, 4, tmp_path) - logits(trained / "gpt2", 4, tmp_path)).abs().max().item() <= 1e-6
    megagrow("checkpoint", "convert", "--load", str(local), "--save", str(te_again), "--target-tp", "1",
             "--target-pp", "1", "--ckpt-format", "torch", "--no-optimizer")
    keys = torch.load(te_again / "iter_0000003" / "mp_rank_00" / "model_optim_rng.pt", weights_only=False)["model"]
    assert "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in keys
    assert "decoder.layers.0.input_layernorm.weight" not in keys


def _resume(data_dir, root, flags, tmp_path, name):
    run = pretrain_job(4, tiny_args(data_dir, **{**flags, "--exit-interval": None, "--load": str(root)}),
                   tmp_path / f"{name}.jsonl")
    assert run.returncode == 0, run.output
    assert "loaded checkpoint" in run.output
    return run.losses()


@pytest.mark.slow
def test_distributed_optimizer_state_survives_conversion(data_dir, trained, tmp_path):
    """Resuming from the converted checkpoint trains exactly as resuming from the source resharded by megatron-core."""
    converted = tmp_path / "tp1pp4"
    megagrow("checkpoint", "convert", "--load", str(trained / "llama_distopt"), "--save", str(converted),
             "--target-tp", "1", "--target-pp", "4", "--rechunk")  # through the streaming writer
    assert json.loads(megagrow("checkpoint", "inspect", str(converted), "--json").stdout)["model"][
        "padded_vocab_size"] == 1152
    target = {**LLAMA, "--tensor-model-parallel-size": "1", "--pipeline-model-parallel-size": "4",
              "--use-distributed-optimizer": ""}
    from_converted = _resume(data_dir, converted, target, tmp_path, "a")
    from_source = _resume(data_dir, trained / "llama_distopt", target, tmp_path, "b")
    assert sorted(from_converted) == [4, 5, 6]
    for it in from_converted:
        assert abs(from_converted[it] - from_source[it]) <= 1e-5
    # And the distributed optimizer resumes bit-identically at its own layout (megatron-core 0.16's
    # torch-Adam restore path needed two fixes for that, see checkpoint/trainer.py).
    own = {**LLAMA, "--use-distributed-optimizer": ""}
    resumed = _resume(data_dir, trained / "llama_distopt", own, tmp_path, "c")
    full = pretrain_job(4, tiny_args(data_dir, **{**own, "--exit-interval": None}), tmp_path / "full.jsonl")
    assert full.returncode == 0, full.output
    assert resumed == {it: full.losses()[it] for it in (4, 5, 6)}


@pytest.mark.slow
def test_torch_format_optimizer_state_survives_conversion(data_dir, trained, tmp_path):
    """torch format TP=2 PP=2 -> torch_dist -> torch TP=1 PP=4: training resumes with the source's losses."""
    mid, converted = tmp_path / "dist", tmp_path / "torch_tp1pp4"
    megagrow("checkpoint", "convert", "--load", str(trained / "gpt2"), "--save", str(mid), "--ckpt-format", "torch_dist")
    megagrow("checkpoint", "convert", "--load", str(mid), "--save", str(converted), "--target-tp", "1",
             "--target-pp", "4", "--ckpt-format", "torch")
    source = _resume(data_dir, trained / "gpt2", {**GPT2, "--ckpt-format": "torch"}, tmp_path, "src")
    target = {**GPT2, "--ckpt-format": "torch", "--tensor-model-parallel-size": "1", "--pipeline-model-parallel-size": "4"}
    resumed = _resume(data_dir, converted, target, tmp_path, "conv")
    assert sorted(resumed) == [4, 5, 6]
    for it in resumed:
        assert abs(resumed[it] - source[it]) <= 1e-5


def _expect_failure(argv, needle, target):
    out = megagrow(*argv, check=False)
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], out.stderr
    assert not os.path.exists(target) and not os.path.exists(str(target) + ".partial")


def test_corrupt_inputs_fail_in_one_line(trained, tmp_path):
    for name, kind in (("llama", "distcp"), ("gpt2", "pt")):
        broken = tmp_path / f"{name}_missing"
        shutil.copytree(trained / name, broken)
        files = sorted(os.path.join(d, f) for d, _, fs in os.walk(broken) for f in fs if f.endswith(kind))
        os.remove(files[-1])
        _expect_failure(["checkpoint", "convert", "--load", str(broken), "--save", str(tmp_path / "out")],
                        "missing shard", tmp_path / "out")
        assert megagrow("checkpoint", "inspect", str(broken), check=False).returncode == 1

        truncated = tmp_path / f"{name}_truncated"
        shutil.copytree(trained / name, truncated)
        files = sorted(os.path.join(d, f) for d, _, fs in os.walk(truncated) for f in fs if f.endswith(kind))
        with open(files[-1], "r+b") as f:
            f.truncate(os.path.getsize(files[-1]) // 2)
        needle = "truncated shard" if kind == "distcp" else "unreadable shard"
        _expect_failure(["checkpoint", "convert", "--load", str(truncated), "--save", str(tmp_path / "out")],
                        needle, tmp_path / "out")

    # A TP rank whose tensor disagrees with the args and the other rank.
    mismatched = tmp_path / "gpt2_mismatch"
    shutil.copytree(trained / "gpt2", mismatched)
    shard = mismatched / "iter_0000003" / "mp_rank_01_000" / "model_optim_rng.pt"
    state = torch.load(shard, weights_only=False)
    state["model"]["decoder.layers.0.mlp.linear_fc1.weight"] = torch.zeros(3, 64)
    torch.save(state, shard)
    _expect_failure(["checkpoint", "convert", "--load", str(mismatched), "--save", str(tmp_path / "out")],
                    "decoder.layers.0.mlp.linear_fc1.weight", tmp_path / "out")
    assert "(3, 64)" in megagrow("checkpoint", "inspect", str(mismatched), check=False).stdout

    # An unknown tensor in a torch_dist checkpoint's args-shaped world: a wrong hidden size in the args.
    wrong_args = tmp_path / "llama_args"
    shutil.copytree(trained / "llama", wrong_args)
    state = read_common_state(str(wrong_args / "iter_0000003"))  # common.pt, or inside the DCP files (0.19)
    state["args"].ffn_hidden_size += 8
    torch.save(state, wrong_args / "iter_0000003" / "common.pt")  # read first by every megatron-core
    _expect_failure(["checkpoint", "convert", "--load", str(wrong_args), "--save", str(tmp_path / "out")],
                    "the args say", tmp_path / "out")


def test_convert_refuses_bad_targets(trained, tmp_path):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    out = megagrow("checkpoint", "convert", "--load", str(trained / "llama"), "--save", str(taken), check=False)
    assert out.returncode == 1 and "not empty" in out.stderr and (taken / "keep.txt").read_text() == "mine"
    _expect_failure(["checkpoint", "convert", "--load", str(trained / "llama"), "--save", str(tmp_path / "o"),
                     "--target-tp", "8"], "--num-query-groups 4 is not divisible by tensor parallel size 8", tmp_path / "o")
    _expect_failure(["checkpoint", "convert", "--load", str(tmp_path / "nowhere"), "--save", str(tmp_path / "o")],
                    "no such directory", tmp_path / "o")
    _expect_failure(["checkpoint", "convert", "--load", str(trained / "llama_distopt"), "--save", str(tmp_path / "o"),
                     "--ckpt-format", "torch"], "distributed optimizer", tmp_path / "o")


@pytest.mark.slow
def test_bf16_optimizer_master_copies_survive_conversion(data_dir, tmp_path):
    """bf16 with the plain optimizer keeps fp32 master copies ('fp32_param'): carried through a rechunked convert."""
    flags = {**LLAMA, "--bf16": "", "--pipeline-model-parallel-size": "1", "--make-vocab-size-divisible-by": "128"}
    src, converted = tmp_path / "bf16", tmp_path / "bf16_tp1"
    run = pretrain_job(2, tiny_args(data_dir, **flags, **{"--save": str(src)}), tmp_path / "src.jsonl")
    assert run.returncode == 0, run.output
    megagrow("checkpoint", "convert", "--load", str(src), "--save", str(converted), "--target-tp", "1", "--rechunk")
    from megagrow.checkpoint.io import open_checkpoint
    assert "fp32_param" in open_checkpoint(str(converted)).optimizer_states
    target = {**flags, "--tensor-model-parallel-size": "1", "--exit-interval": None}
    losses = []
    for root, name in ((converted, "conv"), (src, "from_src")):
        resumed = pretrain_job(1, tiny_args(data_dir, **{**target, "--load": str(root)}), tmp_path / f"{name}.jsonl")
        assert resumed.returncode == 0, resumed.output
        losses.append(resumed.losses())
    assert sorted(losses[0]) == [4, 5, 6] and losses[0] == losses[1]


class _ToyView:
    """A toy format's reader: every unit of the model in one torch file (the whole checkpoint in memory)."""

    format = "toy"
    dp_reshardable = False

    def __new__(cls, it_dir: str):
        import torch
        from megagrow.checkpoint.view import CheckpointView
        saved = torch.load(os.path.join(it_dir, "toy.pt"), weights_only=False)

        class View(CheckpointView):
            format, dp_reshardable, path = "toy", False, it_dir

            def read_globals(self):
                return saved["globals"]

            def read_layer(self, index):
                return saved["layers"][index]
        return View(saved["args"], saved["iteration"], saved["optimizer"], saved["extra"])


def _write_toy(view, it_dir, args, tp, pp, with_optimizer, progress):
    import torch
    keep = (lambda unit: unit) if with_optimizer else (lambda unit: {"model": unit["model"]})
    layers = []
    for i in range(args.num_layers):
        layers.append(keep(view.read_layer(i)))
        progress(i + 1)
    torch.save({"args": args, "iteration": view.iteration, "optimizer": view.optimizer if with_optimizer else None,
                "extra": view.extra, "globals": keep(view.read_globals()), "layers": layers},
               os.path.join(it_dir, "toy.pt"))


def test_a_checkpoint_format_is_one_reader_writer_and_one_registration(trained, tmp_path):
    """A format registered here (reader, writer, detection) serves convert both ways; nothing else changes."""
    from megagrow.checkpoint.io import FORMATS, CheckpointFormat, inspect, open_checkpoint
    from megagrow.cli import main
    FORMATS.register("toy", CheckpointFormat("toy", lambda d: os.path.exists(os.path.join(d, "toy.pt")), _ToyView,
                                             _write_toy))
    try:
        toy, back = tmp_path / "toy", tmp_path / "back"
        assert main(["checkpoint", "convert", "--load", str(trained / "llama"), "--save", str(toy),
                     "--ckpt-format", "toy", "--quiet"]) == 0
        assert inspect(str(toy))["format"] == "toy" and inspect(str(toy))["complete"]
        assert main(["checkpoint", "convert", "--load", str(toy), "--save", str(back), "--ckpt-format", "torch_dist",
                     "--target-tp", "1", "--target-pp", "1", "--quiet"]) == 0
        a, b = open_checkpoint(str(trained / "llama")), open_checkpoint(str(back))
        for unit_a, unit_b in [(a.read_globals(), b.read_globals())] + [(a.read_layer(i), b.read_layer(i))
                                                                         for i in range(a.num_layers)]:
            assert unit_a.keys() == unit_b.keys()
            for state, tensors in unit_a.items():
                for name, t in tensors.items():
                    u = unit_b[state][name]
                    rows = min(len(t), len(u))  # the vocabulary is padded for each TP
                    assert t[:rows].equal(u[:rows]), (state, name)
    finally:
        FORMATS.unregister("toy")
