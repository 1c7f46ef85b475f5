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
from dataclasses import dataclass, field

import torch

from megagrow.checkpoint.errors import CheckpointError
from megagrow.model.shape import padded_vocab_size, shape_problems

Unit = dict[str, dict[str, torch.Tensor]]

LAYER_PREFIX = "decoder.layers."
# Linear modules whose (empty on the local spec) `_extra_state` torch_dist stores per layer.
EXTRA_STATE_MODULES = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")


# megagrow's run-time record, a key of its own beside Megatron-LM's in the common state (Megatron-LM
# ignores it): what is not a flag but must survive a restart or a growth.
RUN_STATE_KEY = "megagrow_state"


def run_state(common: dict, args) -> dict:
    """{growth_masks: the masked width growth still opening or None, validation_curve: [(iteration, loss,
    flops), ...] for stop rules across restarts}; older megagrow checkpoints kept both inside args."""
    record = dict(common.get(RUN_STATE_KEY) or {})
    for key, default in (("growth_masks", None), ("validation_curve", [])):
        record.setdefault(key, getattr(args, key, default))
        if hasattr(args, key):
            delattr(args, key)
    return record


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
    extra: dict = field(default_factory=dict)  # opt_param_scheduler, num_floating_point_operations_so_far, RUN_STATE_KEY

    @property
    def num_layers(self) -> int:
        return self.args.num_layers

    @property
    def run_state(self) -> dict:
        """megagrow's run-time record (see run_state()): growth masks, validation curve."""
        return self.extra.setdefault(RUN_STATE_KEY, run_state({}, self.args))

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

    def placements(self, index: int | None) -> dict:
        """Where the model tensors of layer `index` (None: the globals) lie on disk, as placement.Placement by
        name, for those a view can say (writers then copy bytes instead of reading tensors)."""
        return {}

    def problems(self) -> list[str]:
        """What makes the stored checkpoint incomplete or inconsistent (a reader checks its own files)."""
        return []

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


def vocab_rows(args, tp: int) -> int:
    """Rows of the embedding at TP=tp: padded from the tokenizer's size when the args record it."""
    true_vocab = getattr(args, "tokenizer_vocab_size", None)
    if true_vocab is None:  # Megatron-LM's args keep only the padded size: never drop rows then
        return padded_vocab_size(args.padded_vocab_size, args.make_vocab_size_divisible_by, tp)
    return padded_vocab_size(true_vocab, args.make_vocab_size_divisible_by, tp)


def check_target_parallelism(args, tp: int, pp: int) -> None:
    """Refuse a TP/PP the model cannot be split into, naming the first reason."""
    problems = shape_problems(args, tp, pp)
    if problems:
        raise CheckpointError(f"target TP={tp} PP={pp}: {problems[0]}")
