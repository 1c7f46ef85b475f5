"""The one place that knows how Megatron lays out GPT tensors across parallel ranks.

Every tensor-parallel split is a contiguous chunk of the global tensor along the parameter's
`partition_dim`, except SwiGLU's `linear_fc1`, whose global tensor is [all gate rows; all up rows]
while each rank holds [its gate rows; its up rows]. Pipeline stages number their layers locally;
`layer_number` (1-based, global) on each TransformerLayer gives the global index.
QKV rows are grouped per query group ([q heads..., k, v] per group), so a contiguous dim-0 chunk
is exactly a set of whole groups: no special case is needed for it here.
"""

from __future__ import annotations

import re

import torch

_LOCAL_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


def padded_vocab_size(vocab_size: int, divisible_by: int, tp_size: int) -> int:
    """Megatron-LM pads the vocabulary to a multiple of divisible_by x TP."""
    multiple = divisible_by * tp_size
    return -(-vocab_size // multiple) * multiple


def global_layer_names(model: torch.nn.Module) -> dict[str, str]:
    """Map each local parameter name of one pipeline stage's GPTModel to its global name."""
    offsets = {}
    decoder = getattr(model, "decoder", None)
    if decoder is not None:
        for i, layer in enumerate(decoder.layers):
            offsets[i] = layer.layer_number - 1
    names = {}
    for name, _ in model.named_parameters():
        m = _LOCAL_LAYER.match(name)
        names[name] = (f"decoder.layers.{offsets[int(m.group(1))]}." + name[m.end():]) if m else name
    return names


# Tensor-parallel split dimension by parameter name (megatron-core's Column/RowParallelLinear and
# VocabParallelEmbedding). Parameters not listed are replicated on every TP rank. The attributes
# megatron-core sets on parameters are absent when it skips initialisation, so names decide.
_COLUMN_PARALLEL = ("embedding.word_embeddings.weight", "output_layer.weight",
                    ".linear_qkv.weight", ".linear_qkv.bias", ".linear_fc1.weight", ".linear_fc1.bias")
_ROW_PARALLEL = (".linear_proj.weight", ".linear_fc2.weight")


def tp_partition_dim(name: str) -> int | None:
    if name.endswith(_COLUMN_PARALLEL):
        return 0
    if name.endswith(_ROW_PARALLEL):
        return 1
    return None


def is_gated_fc1(name: str, gated_linear_unit: bool) -> bool:
    return gated_linear_unit and ".mlp.linear_fc1." in name


def tp_global_shape(local_shape, name: str, tp_size: int) -> tuple[int, ...]:
    shape, dim = list(local_shape), tp_partition_dim(name)
    if dim is not None:
        shape[dim] *= tp_size
    return tuple(shape)


def tp_local_chunk(full: torch.Tensor, name: str, tp_rank: int, tp_size: int,
                   gated_linear_unit: bool) -> torch.Tensor:
    """This rank's chunk of a global (unsharded) tensor, in the order the local parameter stores it."""
    dim = tp_partition_dim(name)
    if dim is None or tp_size == 1:
        return full
    if is_gated_fc1(name, gated_linear_unit):
        gate, up = full.chunk(2, dim=dim)
        return torch.cat([gate.chunk(tp_size, dim=dim)[tp_rank], up.chunk(tp_size, dim=dim)[tp_rank]], dim=dim)
    return full.chunk(tp_size, dim=dim)[tp_rank]
