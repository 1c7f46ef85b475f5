"""The tensor-layout rules every converter and growth operator relies on (fast, no processes)."""

import pytest
import torch

from megagrow.model.layout import (fused_name, optimizer_param_groups, pipeline_stages, resize_vocab_rows, spec_name,
                                   tp_chunk_ranges, tp_local_chunk, tp_partition_dim, tp_unshard)

CASES = [("self_attention.linear_qkv.weight", (48, 16)), ("mlp.linear_fc1.weight", (64, 16)),
         ("mlp.linear_fc1.bias", (64,)), ("self_attention.linear_proj.weight", (16, 32)),
         ("mlp.linear_fc2.weight", (16, 32)), ("self_attention.linear_qkv.layer_norm_weight", (16,)),
         ("embedding.word_embeddings.weight", (96, 16))]


@pytest.mark.parametrize("name,shape", CASES)
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_tp_split_and_merge_are_inverse(name, shape, tp):
    full = torch.arange(torch.Size(shape).numel(), dtype=torch.float32).reshape(shape)
    shards = [tp_local_chunk(full, name, r, tp, gated_linear_unit=True) for r in range(tp)]
    assert torch.equal(tp_unshard(shards, name, gated_linear_unit=True), full)
    for r, boxes in enumerate(tp_chunk_ranges(name, shape, tp, gated_linear_unit=True)):
        parts = []
        for offsets, sizes in boxes:
            part = full
            for dim, (o, n) in enumerate(zip(offsets, sizes)):
                part = part.narrow(dim, o, n)
            parts.append(part)
        dim = tp_partition_dim(name) or 0
        assert torch.equal(torch.cat(parts, dim=dim), shards[r])


def test_swiglu_rank_holds_its_gate_then_its_up_rows():
    full = torch.arange(8.0).unsqueeze(1)  # gate rows 0..3, up rows 4..7
    assert tp_local_chunk(full, "mlp.linear_fc1.weight", 1, 2, True).flatten().tolist() == [2, 3, 6, 7]
    assert tp_local_chunk(full, "decoder.layers.0.mlp.linear_fc1.weight", 1, 2, True).flatten().tolist() == [2, 3, 6, 7]
    assert tp_local_chunk(full, "mlp.linear_fc1.weight", 1, 2, False).flatten().tolist() == [4, 5, 6, 7]


def test_pipeline_stages_even_and_uneven():
    assert pipeline_stages(24, 4) == [(0, 6), (6, 6), (12, 6), (18, 6)]
    assert pipeline_stages(24, 4, first=5, last=7) == [(0, 5), (5, 6), (11, 6), (17, 7)]
    assert pipeline_stages(10, 3, last=2) == [(0, 4), (4, 4), (8, 2)]
    assert pipeline_stages(4, 2, first=1, last=3) == [(0, 1), (1, 3)]
    with pytest.raises(ValueError):
        pipeline_stages(10, 4)
    with pytest.raises(ValueError):
        pipeline_stages(4, 2, first=1, last=2)


def test_names_vocab_rows_and_optimizer_groups():
    assert fused_name("input_layernorm.weight") == "self_attention.linear_qkv.layer_norm_weight"
    assert spec_name("mlp.linear_fc1.layer_norm_weight", "local") == "pre_mlp_layernorm.weight"
    assert spec_name("mlp.linear_fc1.layer_norm_weight", "transformer_engine") == "mlp.linear_fc1.layer_norm_weight"
    t = torch.ones(5, 2)
    assert resize_vocab_rows(t, 8)[5:].abs().sum() == 0 and resize_vocab_rows(t, 3).shape == (3, 2)
    groups = optimizer_param_groups([("a.weight", (4, 4)), ("a.bias", (4,)), ("norm.weight", (4,)), ("b.weight", (2, 4))])
    assert groups == [["a.weight", "b.weight"], ["a.bias", "norm.weight"]]
