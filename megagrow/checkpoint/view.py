"""A Megatron checkpoint seen unsharded, one layer at a time.

Every reader (either format, any TP/PP) and every growth operator presents a checkpoint as a
`CheckpointView`: the saved `args`, the iteration, the non-tensor state, and tensors read on demand
per unit — the globals (embeddings, final norm, output layer) or one transformer layer. A unit is
`{state: {name: tensor}}` where state is "model" or an optimizer state ("exp_avg", "exp_avg_sq",
"param" for the distributed optimizer's fp32 main copy) and names are torch_dist key names, relative
to the layer for layer units (`self_attention.linear_qkv.weight`). Writers pull units from a view,
so memory holds a few units at a time, never the model.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field

import torch

from megagrow.checkpoint.errors import CheckpointError
from megagrow.model.layout import padded_vocab_size

Unit = dict[str, dict[str, torch.Tensor]]

LAYER_PREFIX = "decoder.layers."
# Linear modules whose (empty on the local spec) `_extra_state` torch_dist stores per layer.
EXTRA_STATE_MODULES = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")


@dataclass
class OptimizerCommon:
    """The optimizer's non-tensor state, format-neutral."""
    param_groups: list[dict]  # hyper-parameters per group (decay group first), without 'params'/'step'
    step: float
    distributed: bool  # megatron's distributed optimizer (keeps an fp32 'param' state)
    torch_dist_common: dict | None = None  # common.pt's 'optimizer' entry as read, rewritten verbatim when possible


@dataclass
class CheckpointView:
    args: argparse.Namespace
    iteration: int
    optimizer: OptimizerCommon | None = None
    extra: dict = field(default_factory=dict)  # opt_param_scheduler, num_floating_point_operations_so_far

    @property
    def num_layers(self) -> int:
        return self.args.num_layers

    @property
    def optimizer_states(self) -> tuple[str, ...]:
        """Per-parameter optimizer tensors: Adam's moments, plus the fp32 main copy where one is kept
        ('param' for the distributed optimizer, 'fp32_param' for the bf16/fp16 plain optimizer)."""
        if self.optimizer is None:
            return ()
        return ("param", "exp_avg", "exp_avg_sq") if self.optimizer.distributed else ("exp_avg", "exp_avg_sq")

    def read_globals(self) -> Unit:
        raise NotImplementedError

    def read_layer(self, index: int) -> Unit:
        raise NotImplementedError

    def close(self) -> None:
        pass


class DerivedView(CheckpointView):
    """A view computed from another (re-padded, grown...): same iteration and optimizer, new args.

    Reads pass through to `inner` unless a subclass transforms them; so does closing."""

    def __init__(self, inner: CheckpointView, args=None):
        super().__init__(inner.args if args is None else args, inner.iteration, inner.optimizer, inner.extra)
        self.inner = inner

    @property
    def optimizer_states(self) -> tuple[str, ...]:
        return self.inner.optimizer_states

    def read_globals(self) -> Unit:
        return self.inner.read_globals()

    def read_layer(self, index: int) -> Unit:
        return self.inner.read_layer(index)

    def close(self) -> None:
        self.inner.close()


def gated(args) -> bool:
    return bool(getattr(args, "swiglu", False))


def tied(args) -> bool:
    return not getattr(args, "untie_embeddings_and_output_weights", False)


def vocab_rows(args, tp: int) -> int:
    """Rows of the embedding at TP=tp: padded from the tokenizer's size when the args record it."""
    true_vocab = getattr(args, "tokenizer_vocab_size", None)
    if true_vocab is None:  # Megatron-LM's args keep only the padded size: never drop rows then
        return padded_vocab_size(args.padded_vocab_size, args.make_vocab_size_divisible_by, tp)
    return padded_vocab_size(true_vocab, args.make_vocab_size_divisible_by, tp)


def kv_channels(args) -> int:
    return getattr(args, "kv_channels", None) or args.hidden_size // args.num_attention_heads


def query_groups(args) -> int:
    if getattr(args, "group_query_attention", False) and getattr(args, "num_query_groups", None):
        return args.num_query_groups
    return args.num_attention_heads


def expected_shapes(args) -> tuple[dict[str, tuple], dict[str, tuple]]:
    """(global tensor shapes, per-layer tensor shapes) of a GPT model with these args."""
    h, ffn, d = args.hidden_size, args.ffn_hidden_size, kv_channels(args)
    heads, groups = args.num_attention_heads, query_groups(args)
    bias = getattr(args, "add_bias_linear", True)
    layer_norm = getattr(args, "normalization", "LayerNorm") == "LayerNorm"
    fc1_rows = 2 * ffn if gated(args) else ffn
    layer = {"self_attention.linear_qkv.layer_norm_weight": (h,),
             "self_attention.linear_qkv.weight": ((heads + 2 * groups) * d, h),
             "self_attention.linear_proj.weight": (h, heads * d),
             "mlp.linear_fc1.layer_norm_weight": (h,),
             "mlp.linear_fc1.weight": (fc1_rows, h),
             "mlp.linear_fc2.weight": (h, ffn)}
    if layer_norm:
        layer["self_attention.linear_qkv.layer_norm_bias"] = (h,)
        layer["mlp.linear_fc1.layer_norm_bias"] = (h,)
    if bias:
        layer.update({"self_attention.linear_qkv.bias": ((heads + 2 * groups) * d,),
                      "self_attention.linear_proj.bias": (h,), "mlp.linear_fc1.bias": (fc1_rows,),
                      "mlp.linear_fc2.bias": (h,)})
    vocab = args.padded_vocab_size
    glob = {"embedding.word_embeddings.weight": (vocab, h), "decoder.final_layernorm.weight": (h,)}
    if layer_norm:
        glob["decoder.final_layernorm.bias"] = (h,)
    if getattr(args, "position_embedding_type", "learned_absolute") == "learned_absolute":
        glob["embedding.position_embeddings.weight"] = (args.max_position_embeddings, h)
    if not tied(args):
        glob["output_layer.weight"] = (vocab, h)
    return glob, layer


def layer_param_order(args, transformer_impl: str = "local") -> list[str]:
    """Tensor names of one layer in megatron-core's named_parameters order (local spec modules)."""
    _, shapes = expected_shapes(args)
    order = ["self_attention.linear_qkv.layer_norm_weight", "self_attention.linear_qkv.layer_norm_bias",
             "self_attention.linear_proj.weight", "self_attention.linear_proj.bias",
             "self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias",
             "mlp.linear_fc1.layer_norm_weight", "mlp.linear_fc1.layer_norm_bias",
             "mlp.linear_fc1.weight", "mlp.linear_fc1.bias", "mlp.linear_fc2.weight", "mlp.linear_fc2.bias"]
    return [n for n in order if n in shapes]


def check_target_parallelism(args, tp: int, pp: int) -> None:
    """Refuse a TP/PP the model cannot be split into, naming the first reason."""
    checks = [(args.num_attention_heads % tp == 0, f"--num-attention-heads {args.num_attention_heads}"),
              (query_groups(args) % tp == 0, f"--num-query-groups {query_groups(args)}"),
              (args.ffn_hidden_size % tp == 0, f"--ffn-hidden-size {args.ffn_hidden_size}")]
    for ok, what in checks:
        if not ok:
            raise CheckpointError(f"--target-tp {tp}: {what} is not divisible by {tp}")
    if pp > args.num_layers or (args.num_layers % pp and getattr(args, "decoder_last_pipeline_num_layers", None)
                                is None and getattr(args, "decoder_first_pipeline_num_layers", None) is None):
        raise CheckpointError(f"--target-pp {pp}: {args.num_layers} layers do not split into {pp} equal stages")


def parameter_count(args) -> int:
    glob, layer = expected_shapes(args)
    return sum(math.prod(s) for s in glob.values()) + args.num_layers * sum(math.prod(s) for s in layer.values())
