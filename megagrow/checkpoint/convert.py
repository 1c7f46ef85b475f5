"""`megagrow checkpoint convert`: rewrite a checkpoint at another TP/PP (and model chunks per pipeline rank)
and/or format."""

from __future__ import annotations

from megagrow.checkpoint.target import check_target
from megagrow.checkpoint.io import (VocabResized, check_source, open_checkpoint, target_args, writable_format,
                                    write_checkpoint)


def convert(load: str, save: str, target_tp: int | None = None, target_pp: int | None = None,
            fmt: str | None = None, with_optimizer: bool = True, force: bool = False,
            progress: bool = True, rechunk: bool = False, target_vpp: int | None = None) -> str:
    """torch_dist to torch_dist copies the stored chunks byte for byte (they hold global coordinates,
    valid at any parallelism) unless `rechunk` asks for the chunks the target ranks would write."""
    check_target(save, force, load)
    view = open_checkpoint(load)
    check_source(view, with_optimizer)
    src = view.args
    tp = target_tp or src.tensor_model_parallel_size
    pp = target_pp or src.pipeline_model_parallel_size
    fmt = fmt or writable_format(view)
    args = target_args(src, tp, pp, fmt, target_vpp)
    # dp_reshardable's flat optimizer buckets are not per-parameter chunks: stream those checkpoints
    copy_chunks = view.format == fmt == "torch_dist" and not rechunk and not view.dp_reshardable
    return write_checkpoint(view if copy_chunks else VocabResized(view, args.padded_vocab_size), save, args, fmt,
                            with_optimizer and view.optimizer is not None, force, progress,
                            label=f"converting TP{src.tensor_model_parallel_size}/PP"
                                  f"{src.pipeline_model_parallel_size} -> TP{tp}/PP{pp}", copy_chunks=copy_chunks,
                            load=load)
