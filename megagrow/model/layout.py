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

from megagrow.model.shape import expected_shapes

_LOCAL_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


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
    return gated_linear_unit and ("." + name).find(".mlp.linear_fc1.") >= 0


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


def tp_unshard(shards: list[torch.Tensor], name: str, gated_linear_unit: bool) -> torch.Tensor:
    """The global tensor from every TP rank's local tensor (the inverse of tp_local_chunk)."""
    dim = tp_partition_dim(name)
    if dim is None or len(shards) == 1:
        return shards[0]
    if is_gated_fc1(name, gated_linear_unit):
        halves = [s.chunk(2, dim=dim) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=dim)
    return torch.cat(shards, dim=dim)


def tp_chunk_ranges(name: str, global_shape, tp_size: int, gated_linear_unit: bool):
    """For each TP rank, the (offsets, sizes) boxes of the global tensor it holds, in local order.

    One box per rank, except SwiGLU fc1: a gate box then an up box.
    """
    dim = tp_partition_dim(name)
    shape = list(global_shape)
    if dim is None:
        return [[((0,) * len(shape), tuple(shape))] for _ in range(tp_size)]
    parts = 2 if is_gated_fc1(name, gated_linear_unit) else 1
    step = shape[dim] // (parts * tp_size)
    boxes = []
    for r in range(tp_size):
        rank_boxes = []
        for part in range(parts):
            offsets, sizes = [0] * len(shape), list(shape)
            offsets[dim], sizes[dim] = part * (shape[dim] // parts) + r * step, step
            rank_boxes.append((tuple(offsets), tuple(sizes)))
        boxes.append(rank_boxes)
    return boxes


# The Transformer Engine spec fuses each norm into the linear after it; the local spec keeps it a
# module of its own. torch_dist uses the fused names for both, the legacy `torch` format the
# spec's own. The unsharded view uses the fused (torch_dist) names.
_LOCAL_TO_FUSED = {"input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
                   "input_layernorm.bias": "self_attention.linear_qkv.layer_norm_bias",
                   "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
                   "pre_mlp_layernorm.bias": "mlp.linear_fc1.layer_norm_bias"}
_FUSED_TO_LOCAL = {v: k for k, v in _LOCAL_TO_FUSED.items()}


def fused_name(layer_relative_name: str) -> str:
    return _LOCAL_TO_FUSED.get(layer_relative_name, layer_relative_name)


def spec_name(layer_relative_name: str, transformer_impl: str) -> str:
    """The key a layer tensor has in a `torch`-format state dict of the given spec."""
    if transformer_impl == "local":
        return _FUSED_TO_LOCAL.get(layer_relative_name, layer_relative_name)
    return layer_relative_name


def is_norm_weight(name: str) -> bool:
    """A norm's scale (either spec's names, q/k norms, the final norm): --apply-layernorm-1p stores it minus 1."""
    module, param = ("." + name).rsplit(".", 2)[-2:]
    return param == "layer_norm_weight" or (param == "weight" and "norm" in module)


def split_layer_key(key: str) -> tuple[int, str] | None:
    """`decoder.layers.3.mlp.linear_fc1.weight` -> (3, 'mlp.linear_fc1.weight'); None for other keys."""
    m = _LOCAL_LAYER.match(key)
    return (int(m.group(1)), key[m.end():]) if m else None


def pipeline_stages(num_layers: int, pp_size: int, first: int | None = None, last: int | None = None):
    """(first global layer, layer count) of each pipeline stage, as megatron-core assigns them.

    `first`/`last` are --decoder-first/last-pipeline-num-layers (uneven stages); the other stages
    share the remaining layers evenly.
    """
    if pp_size == 1:
        return [(0, num_layers)]
    counts = [None] * pp_size
    if first is not None:
        counts[0] = first
    if last is not None:
        counts[-1] = last
    rest = [i for i, c in enumerate(counts) if c is None]
    left = num_layers - sum(c for c in counts if c is not None)
    if rest:
        if left < 0 or left % len(rest):
            raise ValueError(f"{num_layers} layers do not split evenly over {len(rest)} middle pipeline stages")
        for i in rest:
            counts[i] = left // len(rest)
    elif left != 0:
        raise ValueError(f"pipeline stage layer counts add up to {sum(counts)}, not {num_layers}")
    starts = [sum(counts[:i]) for i in range(pp_size)]
    return list(zip(starts, counts))


def optimizer_param_groups(names_and_shapes: list[tuple[str, tuple]]) -> list[list[str]]:
    """Parameter names per optimizer group, in the order megatron-core's optimizer indexes them on one rank.

    megatron-core builds two parameter groups, sorted with the default one first: weights with
    weight decay, then biases and 1-D parameters (no weight decay); each keeps named_parameters order.
    """
    decay = [n for n, s in names_and_shapes if not (len(s) == 1 or n.endswith(".bias"))]
    no_decay = [n for n, s in names_and_shapes if len(s) == 1 or n.endswith(".bias")]
    return [decay, no_decay]


def resize_vocab_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """Drop or add (zero) padding rows of an embedding/output-layer tensor."""
    if t.shape[0] == rows:
        return t
    if t.shape[0] > rows:
        return t[:rows]
    return torch.cat([t, t.new_zeros((rows - t.shape[0],) + tuple(t.shape[1:]))])


# megatron-core's GPTModel registers the embedding, then the decoder (its layers, then the final
# norm), then the output layer; named_parameters() follows registration order.
_GPT_FIRST_STAGE = ("embedding.word_embeddings.weight", "embedding.position_embeddings.weight")
_GPT_LAST_STAGE = ("decoder.final_layernorm.weight", "decoder.final_layernorm.bias", "output_layer.weight")
# A layer's input norm is a module of its own before self_attention in the local spec; with Transformer
# Engine it lives inside linear_qkv, which SelfAttention registers after linear_proj.
_INPUT_NORM = ("self_attention.linear_qkv.layer_norm_weight", "self_attention.linear_qkv.layer_norm_bias")


def gpt_parameter_order(present, local_layer_order: list[str], layers, first_stage: bool, last_stage: bool,
                        transformer_impl: str = "local") -> list[str]:
    """Global names of one pipeline stage's GPTModel parameters in named_parameters() order.

    `present`: the non-layer names the model has; `local_layer_order`: one layer's (fused) names
    in the local spec's order (view.layer_param_order); `layers`: the stage's global layer indices.
    """
    layer = list(local_layer_order)
    if transformer_impl == "transformer_engine":
        norm = [n for n in layer if n in _INPUT_NORM]
        layer = [n for n in layer if n not in _INPUT_NORM]
        after = max((i + 1 for i, n in enumerate(layer) if n.startswith("self_attention.linear_proj.")), default=0)
        layer = layer[:after] + norm + layer[after:]
    names = [n for n in _GPT_FIRST_STAGE if n in present] if first_stage else []
    names += [f"decoder.layers.{i}.{n}" for i in layers for n in layer]
    return names + ([n for n in _GPT_LAST_STAGE if n in present] if last_stage else [])


def layer_param_order(args, transformer_impl: str = "local") -> list[str]:
    """Tensor names of one layer in megatron-core's named_parameters order (local spec modules)."""
    _, shapes = expected_shapes(args)
    order = ["self_attention.linear_qkv.layer_norm_weight", "self_attention.linear_qkv.layer_norm_bias",
             "self_attention.linear_proj.weight", "self_attention.linear_proj.bias",
             "self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias",
             "self_attention.q_layernorm.weight", "self_attention.q_layernorm.bias",
             "self_attention.k_layernorm.weight", "self_attention.k_layernorm.bias",
             "mlp.linear_fc1.layer_norm_weight", "mlp.linear_fc1.layer_norm_bias",
             "mlp.linear_fc1.weight", "mlp.linear_fc1.bias", "mlp.linear_fc2.weight", "mlp.linear_fc2.bias"]
    return [n for n in order if n in shapes]
