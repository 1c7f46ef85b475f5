"""Parameter initialisation that does not depend on the parallel layout.

megatron-core initialises each rank from its own RNG stream, so the same seed gives different
models at TP=1 and TP=2, or PP=1 and PP=2. megagrow draws every parameter's *global* tensor from a
generator keyed by (seed, global parameter name) and keeps this rank's chunk: one seed, one model,
whatever the layout. That makes runs comparable across layouts, and grown models reproducible.
Rules follow Megatron-LM: normal(0, std) weights, std/sqrt(2L) for the output projections of
attention and MLP, zero biases, unit norm weights (0 with --apply-layernorm-1p, whose norms scale by
1 + weight); padded vocabulary rows are zero.
"""

from __future__ import annotations

import math
import zlib

import torch

from megatron.core.tensor_parallel import set_tensor_model_parallel_attributes

from megagrow.model.layout import global_layer_names, tp_global_shape, tp_local_chunk, tp_partition_dim

_SCALED = (".self_attention.linear_proj.weight", ".mlp.linear_fc2.weight")


def _generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


def init_global_tensor(name: str, shape: tuple[int, ...], seed: int, std: float, num_layers: int,
                 vocab_size: int, zero_centered_gamma: bool = False) -> torch.Tensor:
    module, param = name.rsplit(".", 2)[-2:]
    if "norm" in module or "norm" in param:  # local spec's *layernorm.weight, TE's layer_norm_weight
        unit = param.endswith("weight") and not zero_centered_gamma
        return torch.ones(shape) if unit else torch.zeros(shape)
    if name.endswith("bias"):
        return torch.zeros(shape)
    if name.endswith(_SCALED):
        std = std / math.sqrt(2.0 * num_layers)
    if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        # Draw only the real vocabulary so padding (which changes with TP) does not move any value.
        full = torch.zeros(shape)
        full[:vocab_size].normal_(0.0, std, generator=_generator(seed, name))
        return full
    return torch.empty(shape).normal_(0.0, std, generator=_generator(seed, name))


@torch.no_grad()
def initialize_parameters(model: torch.nn.Module, config, seed: int, vocab_size: int,
                          tp_rank: int, tp_size: int, tied_embeddings: bool) -> None:
    """Overwrite every parameter of one pipeline stage's GPTModel with its layout-invariant value."""
    names = global_layer_names(model)
    for local_name, param in model.named_parameters():
        name = names[local_name]
        if tied_embeddings and name == "output_layer.weight":
            name = "embedding.word_embeddings.weight"  # last stage's copy of the tied embedding
        full = init_global_tensor(name, tp_global_shape(param.shape, name, tp_size), seed, config.init_method_std,
                            config.num_layers, vocab_size, config.layernorm_zero_centered_gamma)
        param.copy_(tp_local_chunk(full, name, tp_rank, tp_size, config.gated_linear_unit))
        # megatron-core only tags split weights when it initialises them itself; gradient-norm and
        # optimizer code read these tags to tell split parameters from replicated ones.
        dim = tp_partition_dim(name)
        if dim is not None and not hasattr(param, "tensor_model_parallel"):
            set_tensor_model_parallel_attributes(param, True, dim, 1)
