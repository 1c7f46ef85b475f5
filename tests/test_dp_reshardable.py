"""The distributed optimizer's dp_reshardable torch_dist state (Megatron-LM's default), read per parameter:
it equals the fully_reshardable checkpoint of the same run, and inspect / convert carry it."""

import copy
import json
import math
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader

from conftest import ROOT
from megagrow.checkpoint.io import open_checkpoint
from megagrow.checkpoint.dcp_stream import optimizer_common_to_torch_dist
from megagrow.checkpoint.dp_reshardable import bucket_slices, rank_parameters

FIXTURES = "/work/shared/fixtures/megatron-lm"
DP = f"{FIXTURES}/distopt_dp2"
FR = f"{FIXTURES}/distopt_dp2_fully_reshardable"
pytestmark = pytest.mark.skipif(not os.path.isdir(DP) or not os.path.isdir(FR), reason="Megatron-LM fixtures absent")


def units(view):
    yield "globals", view.read_globals()
    for i in range(view.num_layers):
        yield f"layer {i}", view.read_layer(i)


def assert_same_optimizer_state(a, b):
    assert a.optimizer_states == b.optimizer_states == ("exp_avg", "exp_avg_sq", "param")
    for (where, ua), (_, ub) in zip(units(a), units(b)):
        for state in ("model",) + a.optimizer_states:
            assert ua[state].keys() == ub[state].keys(), (where, state)
            for name, t in ua[state].items():
                assert t.shape == ub[state][name].shape, (where, state, name)
                torch.testing.assert_close(t, ub[state][name], rtol=0, atol=1e-7, msg=f"{where} {state} {name}")


def test_matches_fully_reshardable():
    dp, fr = open_checkpoint(DP), open_checkpoint(FR)
    assert dp.dp_reshardable and not fr.dp_reshardable
    assert dp.optimizer.step == fr.optimizer.step == 10
    assert dp.optimizer.param_groups == fr.optimizer.param_groups and len(dp.optimizer.param_groups) == 2
    # written back as the fully_reshardable common entry, not the dp_reshardable one
    assert optimizer_common_to_torch_dist(dp.optimizer) == optimizer_common_to_torch_dist(fr.optimizer)
    assert not any(k.startswith("optimizer.") for k in dp.tensors)  # flat buckets are not model tensors
    assert_same_optimizer_state(dp, fr)


def test_inspect_reports_optimizer():
    out = subprocess.run([sys.executable, "-m", "megagrow.cli", "checkpoint", "inspect", DP, "--json"], cwd=ROOT,
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stdout + out.stderr
    info = json.loads(out.stdout)
    assert info["complete"] and info["problems"] == []
    assert info["optimizer"] == "distributed adam, step 10"


def test_convert_to_tp2_carries_state(tmp_path):
    from megagrow.cli import main
    src = tmp_path / "src"
    shutil.copytree(DP, src, copy_function=shutil.copyfile)
    assert main(["checkpoint", "convert", "--load", str(src), "--save", str(tmp_path / "out"),
                 "--target-tp", "2", "--quiet"]) == 0
    out = open_checkpoint(str(tmp_path / "out"))
    assert out.args.tensor_model_parallel_size == 2 and not out.dp_reshardable
    keys = FileSystemReader(out.path).read_metadata().state_dict_metadata
    assert not any(k.startswith("optimizer.distributed.") for k in keys)  # streamed, not byte-copied
    common = torch.load(os.path.join(out.path, "common.pt"), weights_only=False)
    assert common["optimizer"]["param_state_sharding_type"] == "fully_reshardable"
    assert out.optimizer.step == 10
    assert_same_optimizer_state(out, open_checkpoint(str(src)))


def test_bucket_layout_matches_megatron_core():
    """Buckets split by size and around the shared embeddings (tied, PP=2), TP=2, Transformer Engine
    order: the slices found from the stored bucket lengths are where megatron-core's own layout code
    (0.19+, which needs no process group) puts each parameter."""
    optimizer = pytest.importorskip("megatron.core.optimizer.distrib_optimizer").DistributedOptimizer
    if not hasattr(optimizer, "_compute_per_buffer_param_layout"):
        pytest.skip("megatron-core < 0.19 computes the layout inside the grad buffer")
    args = copy.deepcopy(open_checkpoint(DP).args)
    args.tensor_model_parallel_size = args.pipeline_model_parallel_size = 2
    args.untie_embeddings_and_output_weights, args.transformer_impl = False, "transformer_engine"
    shared = ("embedding.word_embeddings.weight", "output_layer.weight")
    for rank in range(4):
        named = rank_parameters(args, rank)
        params = [torch.nn.Parameter(torch.empty(shape)) for _, shape in named]
        for (name, _), p in zip(named, params):
            p.shared_embedding = name in shared
        layout = optimizer._compute_per_buffer_param_layout(
            params, 20000, 2, SimpleNamespace(pad_buckets_for_high_nccl_busbw=False))
        assert len(layout.per_bucket_numel_unpadded) > 2
        want = {}
        for (name, _), p in zip(named, params):
            start, _, bucket = layout.param_index_map[p]
            want[name] = (bucket, start - layout.bucket_indices[bucket][0])
        got = bucket_slices([(n, math.prod(s)) for n, s in named], layout.per_bucket_numel_unpadded)
        assert got == want, rank


def test_tp2_pp2_merges_ranks(tmp_path):
    """A dp_reshardable checkpoint at TP=2, PP=2 (one bucket per model-parallel rank) built from the
    fully_reshardable state reads back as that state: ranks are indexed tp + TP * pp and merged over TP."""
    import torch.distributed.checkpoint as dcp
    from megagrow.checkpoint.dcp_stream import TorchDistView
    from megagrow.model.layout import tp_local_chunk
    fr = open_checkpoint(FR)
    args = copy.deepcopy(fr.args)
    args.tensor_model_parallel_size = args.pipeline_model_parallel_size = 2
    full, layers = {}, [fr.read_layer(i) for i in range(fr.num_layers)]
    for state, tensors in fr.read_globals().items():
        full[state] = dict(tensors)
    for i, unit in enumerate(layers):
        for state, tensors in unit.items():
            full[state].update({f"decoder.layers.{i}.{n}": t for n, t in tensors.items()})
    sd = dict(full.pop("model"))
    for name in layers[0]["model"]:  # torch_dist stacks a layer tensor over the layers
        sd["decoder.layers." + name] = torch.stack([unit["model"][name] for unit in layers])
        for i in range(fr.num_layers):
            del sd[f"decoder.layers.{i}.{name}"]

    def obj(value):  # a ShardedObject: DCP stores a non-tensor as torch.save bytes, dist_checkpointing wraps it
        return (value,)

    dtypes = (torch.float32, torch.float32)
    for rank in range(4):
        params, pos, starts = rank_parameters(args, rank), 0, {}
        for name, shape in reversed(params):
            starts[name], pos = -(-pos // 64) * 64, -(-pos // 64) * 64 + math.prod(shape)
        prefix = f"optimizer.distributed.dp_group_idx_{rank}."
        for state in full:
            flat = torch.zeros(pos)
            for name, shape in params:
                chunk = tp_local_chunk(full[state][name], name, rank % 2, 2, True)
                flat[starts[name]:starts[name] + chunk.numel()] = chunk.flatten()
            sd[f"{prefix}gbuf_idx_0.dtype_{dtypes}.bucket_idx_0.{state}"] = flat
        sd[prefix + "per_bucket_numel_unpadded/shard_0_1"] = obj([{dtypes: [pos]}])
        sd[prefix + "optimizer/shard_0_1"] = obj({"param_groups": [{**g, "step": 10.0}
                                                                   for g in fr.optimizer.param_groups]})
    dcp.save(sd, storage_writer=dcp.FileSystemWriter(str(tmp_path)), no_dist=True)
    torch.save({"args": args, "iteration": 10, "optimizer": {"param_state_sharding_type": "dp_reshardable"}},
               tmp_path / "common.pt")
    view = TorchDistView(str(tmp_path))
    assert view.optimizer.step == 10 and view.optimizer.param_groups == fr.optimizer.param_groups
    assert_same_optimizer_state(view, fr)
