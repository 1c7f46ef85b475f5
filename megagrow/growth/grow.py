"""Apply a growth operator to a checkpoint: a grown view over the source, written like any checkpoint.

Depth: each layer of the grown model is built from the plan (growth.depth) on the unsharded view,
optimizer state with it: copied layers keep their Adam moments (and fp32 main copies); a tensor an
operator sets to zero gets zero moments; a fresh random layer gets zero moments and main copies equal
to its new weights. Iteration, scheduler and optimizer hyper-parameters carry over. Pure copy plans
between torch_dist checkpoints copy the stored chunks byte for byte under their new layer indices.
"""

from __future__ import annotations

import sys

import torch

from megagrow.checkpoint.io import (VocabResized, check_source, open_checkpoint, refuse_same_directory, target_args,
                                    write_checkpoint)
from megagrow.checkpoint.view import CheckpointView, DerivedView, Unit
from megagrow.model.shape import expected_shapes, kv_channels
from megagrow.growth.depth import GrowthError, NewLayer, connection_rate, describe
from megagrow.growth.operators import depth_plan, parse_spec
from megagrow.model.init import init_global_tensor

_OUTPUT_PROJECTIONS = ("self_attention.linear_proj.weight", "self_attention.linear_proj.bias",
                       "mlp.linear_fc2.weight", "mlp.linear_fc2.bias")
_MAIN_COPIES = ("param", "fp32_param")  # optimizer states that hold the weights themselves


def _zeroed(name: str, init: str) -> bool:
    if init == "zero_out":
        return name in _OUTPUT_PROJECTIONS
    if init == "redundant":  # paper 002: the new layer's norm weights and all its biases are zero
        return "layer_norm" in name or name.endswith(".bias")
    return False


class DepthGrownView(DerivedView):
    """The source view seen through a layer plan (globals pass through)."""

    def __init__(self, inner: CheckpointView, plan: list[NewLayer], args, seed: int):
        super().__init__(inner, args)
        self.plan, self.seed = plan, seed
        self._last: tuple[int | None, Unit | None] = (None, None)
        self._dtypes: dict[str, torch.dtype] | None = None

    def _source(self, index: int) -> Unit:
        if self._last[0] != index:  # interpolation reads the same layer several times in a row
            self._last = (index, self.inner.read_layer(index))
        return {state: dict(tensors) for state, tensors in self._last[1].items()}

    def read_layer(self, index: int) -> Unit:
        new = self.plan[index]
        if new.init == "random":
            return self._random_layer(index)
        unit = self._source(new.source)
        for state, tensors in unit.items():
            for name, t in tensors.items():
                if _zeroed(name, new.init):
                    tensors[name] = torch.zeros_like(t)
        return unit

    def _random_layer(self, index: int) -> Unit:
        """Initialised as the trainer would (model.init, keyed by seed and the new layer's name)."""
        if self._dtypes is None:
            first = self.inner.read_layer(0)
            self._dtypes = {state: next(iter(t.values())).dtype for state, t in first.items() if t}
        a = self.args
        unit: Unit = {"model": {}}
        for name, shape in expected_shapes(a)[1].items():
            weight = init_global_tensor(f"decoder.layers.{index}.{name}", shape, self.seed,
                                        getattr(a, "init_method_std", 0.02), a.num_layers,
                                        getattr(a, "tokenizer_vocab_size", a.padded_vocab_size))
            unit["model"][name] = weight.to(self._dtypes["model"])
            for state in self.optimizer_states:
                dtype = self._dtypes.get(state, torch.float32)
                unit.setdefault(state, {})[name] = (weight.to(dtype) if state in _MAIN_COPIES
                                                    else torch.zeros(shape, dtype=dtype))
        return unit


def _refuse_open_masks(view: CheckpointView, load: str) -> None:
    masks = getattr(view.args, "growth_masks", None)
    if masks:
        raise GrowthError(f"{load}: its {masks['kind']} growth masks are still opening (until iteration "
                          f"{masks['end']}); train past that iteration before growing again")


def grow(load: str, save: str, op: str, num_layers: int | None = None, target_tp: int | None = None,
         target_pp: int | None = None, fmt: str | None = None, seed: int | None = None, with_optimizer: bool = True,
         force: bool = False, progress: bool = True, rechunk: bool = False,
         data_path: list[str] | None = None) -> tuple[str, list[NewLayer]]:
    """Grow the checkpoint at `load` into `save`; returns (iteration directory written, layer plan;
    for learn the plan its depth map starts from). `data_path`: learn's training data (default the run's)."""
    refuse_same_directory(load, save)
    view = open_checkpoint(load)
    _refuse_open_masks(view, load)
    plan = depth_plan(op, view.num_layers, num_layers)
    check_source(view, with_optimizer)
    src = view.args
    tp, pp = target_tp or src.tensor_model_parallel_size, target_pp or src.pipeline_model_parallel_size
    fmt = fmt or view.format
    args = target_args(src, tp, pp, fmt)
    args.num_layers = len(plan)
    args.decoder_first_pipeline_num_layers = args.decoder_last_pipeline_num_layers = None
    seed = getattr(src, "seed", 1234) if seed is None else seed
    if any(layer.init == "redundant" for layer in plan) and getattr(src, "swiglu", False):
        print("warning: with SwiGLU a redundant layer's FFN gets no gradient (its zero pre-MLP norm makes silu(0)*0); "
              "its attention still trains. --op zero (output projections zero) keeps the whole layer trainable.",
              file=sys.stderr)
    label = f"growing {src.num_layers} -> {len(plan)} layers ({op})"
    name, params = parse_spec(op)
    pure_copy = name != "learn" and all(layer.init == "copy" for layer in plan)
    if pure_copy and view.format == fmt == "torch_dist" and not rechunk and not view.dp_reshardable:
        out = write_checkpoint(view, save, args, fmt, with_optimizer and view.optimizer is not None, force, progress,
                               label, copy_chunks=True, layer_map=[layer.source for layer in plan])
    else:
        if name == "learn":
            from megagrow.growth.learn import learned_view
            inner = learned_view(view, args, params, seed, save, force, [layer.source for layer in plan],
                                 data_path=data_path)
        else:
            inner = DepthGrownView(view, plan, args, seed)
        out = write_checkpoint(VocabResized(inner, args.padded_vocab_size), save, args, fmt,
                               with_optimizer and view.optimizer is not None, force, progress, label)
        if name == "learn":
            inner.save_record(save)
    return out, plan


def grow_width(load: str, save: str, op: str, sizes: dict, target_tp: int | None = None,
               target_pp: int | None = None, fmt: str | None = None, seed: int | None = None,
               with_optimizer: bool = True, force: bool = False, progress: bool = True,
               data_path: list[str] | None = None) -> str:
    """Grow hidden/FFN size and heads (whole query groups); `sizes` holds the new values of
    hidden_size, ffn_hidden_size, num_attention_heads, num_query_groups (None: unchanged)."""
    from megagrow.growth.width import MASKED, WidthGrownView, WidthPlan
    refuse_same_directory(load, save)
    view = open_checkpoint(load)
    _refuse_open_masks(view, load)
    src = view.args
    tp, pp = target_tp or src.tensor_model_parallel_size, target_pp or src.pipeline_model_parallel_size
    args = target_args(src, tp, pp, fmt or view.format)
    args.kv_channels = kv_channels(src)  # heads grow in number, not in size
    for key, value in sizes.items():
        if value is not None:
            setattr(args, key, value)
    if sizes.get("num_query_groups") is not None:
        args.group_query_attention = True
    elif not getattr(args, "group_query_attention", False):
        args.num_query_groups = args.num_attention_heads  # multi-head attention: one group per head, as the trainer sets
    plan = WidthPlan(src, args, op)
    if plan.op in MASKED:  # msg/pdg: the trainer opens the masks over the next `steps` iterations
        args.growth_masks = {"kind": plan.op, "begin": view.iteration, "end": view.iteration + plan.steps,
                             "hidden_size": src.hidden_size, "ffn_hidden_size": src.ffn_hidden_size,
                             "num_attention_heads": src.num_attention_heads}
    if plan.norm_scale != 1.0:
        # RMSNorm over H dims of which h are non-zero: mean(x^2) shrinks by h/H, and so must epsilon.
        args.layernorm_epsilon = getattr(src, "layernorm_epsilon", 1e-5) * src.hidden_size / args.hidden_size
        print(f"note: --norm-epsilon scaled to {args.layernorm_epsilon:.6g} (recorded in the checkpoint's args) so that "
              "the grown model computes the same function; pass it when training the grown model", file=sys.stderr)
    check_source(view, with_optimizer)
    seed = getattr(src, "seed", 1234) if seed is None else seed
    if plan.op == "learn":
        from megagrow.growth.learn import learned_view
        inner = learned_view(view, args, parse_spec(op)[1], seed, save, force, width=plan, data_path=data_path)
    else:
        inner = WidthGrownView(view, plan, args, seed)
    label = f"growing width h {src.hidden_size} -> {args.hidden_size}, ffn {src.ffn_hidden_size} -> " \
            f"{args.ffn_hidden_size}, heads {src.num_attention_heads} -> {args.num_attention_heads} ({op})"
    out = write_checkpoint(VocabResized(inner, args.padded_vocab_size), save, args, fmt or view.format,
                           with_optimizer and view.optimizer is not None, force, progress, label)
    if plan.op == "learn":
        inner.save_record(save)
    return out


def plan_report(plan: list[NewLayer]) -> str:
    return f"layers: {describe(plan)}\nconnection rate R_c: {connection_rate(plan):.3f}"
