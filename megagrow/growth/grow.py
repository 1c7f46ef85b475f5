"""Apply a growth operator to a checkpoint: a grown view over the source, written like any checkpoint.

The spec is parsed and planned once against the source's shape (growth.registry); the operator then
shapes the target's args and builds the grown view (growth.depth, growth.width, growth.learn, growth.mixture).
Iteration, scheduler and optimizer hyper-parameters carry over (the first checkpoint's, for mixture, which
recombines two). Plans whose new layers are all exact copies, between torch_dist checkpoints, copy the stored
chunks byte for byte under their new layer indices.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from megagrow.checkpoint.target import check_target
from megagrow.checkpoint.io import (VocabResized, check_source, open_checkpoint, target_args, writable_format,
                                    write_checkpoint)
from megagrow.checkpoint.view import CheckpointView
from megagrow.growth.mixture import check_pair
from megagrow.growth.operators import GrowthError
from megagrow.growth.registry import check_reaches, plan_growth
from megagrow.model.shape import ModelShape


@dataclass
class Grown:
    path: str  # the iteration directory written
    report: str  # lines for the user (depth: the layer plan and R_c; width: the size change)


def _refuse_open_masks(view: CheckpointView, load: str) -> None:
    masks = view.run_state.get("growth_masks")
    if masks:
        raise GrowthError(f"{load}: its {masks['kind']} growth masks are still opening (until iteration "
                          f"{masks['end']}); train past that iteration before growing again")


def grow(load: str, save: str, spec: str, sizes: dict[str, int | None], tp: int | None = None, pp: int | None = None,
         fmt: str | None = None, *, seed: int | None = None, with_optimizer: bool = True, force: bool = False,
         progress: bool = True, rechunk: bool = False, data_path: list[str] | None = None,
         vpp: int | None = None, second: str | None = None) -> Grown:
    """Grow the checkpoint at `load` into `save` with the operator `spec`. `sizes`: the grown model's
    num_layers, hidden_size, ffn_hidden_size, num_attention_heads, num_query_groups (None or missing:
    unchanged; a depth spec may fix num_layers itself). `data_path`: learn's training data (default the run's).
    `second`: the second checkpoint of an operator that recombines two (mixture), of the same shape."""
    check_target(save, force, load)
    if second:
        check_target(save, force, second)
    view = open_checkpoint(load)
    _refuse_open_masks(view, load)
    src = view.args
    old = ModelShape.from_args(src)
    plan = plan_growth(spec, old, old.with_sizes(**sizes))
    check_reaches(spec, plan, sizes)
    op = plan.op
    if data_path and not op.reads_data:
        raise GrowthError("--data-path is read only by --op learn (the data its maps are fitted on)")
    if op.sources == 2 and not second:
        raise GrowthError(f"--op {spec} recombines two trained models: give the second with --load-second")
    if second and op.sources == 1:
        raise GrowthError(f"--load-second is read only by operators that recombine two models (mixture), not "
                          f"{op.name}")
    check_source(view, with_optimizer)
    extra = {}
    if second:
        extra["second"] = other = open_checkpoint(second)
        check_pair(view, other, f"--load-second {second}")
        _refuse_open_masks(other, second)
        check_source(other, with_optimizer)
        if with_optimizer and view.optimizer is not None and (
                other.optimizer is None or other.optimizer.distributed != view.optimizer.distributed):
            print(f"note: {second} has {'no' if other.optimizer is None else 'another kind of'} optimizer state: "
                  "the grown checkpoint carries none", file=sys.stderr)
            with_optimizer = False
    fmt = fmt or writable_format(view)
    args = target_args(src, tp or src.tensor_model_parallel_size, pp or src.pipeline_model_parallel_size, fmt, vpp)
    for note in op.configure(plan, args, view):
        print(note, file=sys.stderr)
    seed = getattr(src, "seed", 1234) if seed is None else seed
    label = f"growing {plan.change()} ({spec})"
    with_optimizer = with_optimizer and view.optimizer is not None
    layer_map = op.layer_map(plan)
    if layer_map is not None and view.format == fmt == "torch_dist" and not rechunk and not view.dp_reshardable:
        out = write_checkpoint(view, save, args, fmt, with_optimizer, force, progress, label, copy_chunks=True,
                               layer_map=layer_map, load=load)
    else:
        inner = op.view(view, plan, args, seed, save=save, force=force, data_path=data_path, **extra)
        out = write_checkpoint(VocabResized(inner, args.padded_vocab_size), save, args, fmt, with_optimizer, force,
                               progress, label, load=load)
        op.written(inner, save)
    return Grown(out, plan.report())
