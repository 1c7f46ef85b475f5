"""Open, inspect and convert Megatron checkpoints of either format, at any TP/PP.

`open_checkpoint` picks the reader; `write_checkpoint` writes any view (a reader, or a growth
operator's view of one) to a new checkpoint directory, atomically; `convert` is the two together.
"""

from __future__ import annotations

import copy
import os
import shutil
import sys
import time

from megagrow.checkpoint.errors import TRACKER, CheckpointError, detect_format, iteration_dir, read_tracker
from megagrow.checkpoint.view import (CheckpointView, DerivedView, Unit, check_target_parallelism, expected_shapes,
                                      parameter_count, query_groups, tied, vocab_rows)
from megagrow.model.layout import resize_vocab_rows

FORMATS = ("torch", "torch_dist")


def find_iteration_dir(path: str) -> str:
    """A checkpoint root (with the tracker file) or one iteration directory -> the iteration directory."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such directory")
    if detect_format(path):
        return path
    iteration = read_tracker(path)
    if iteration is None:
        raise CheckpointError(f"{path}: not a checkpoint (no {TRACKER} and no checkpoint files)")
    it_dir = iteration_dir(path, iteration)
    if not os.path.isdir(it_dir):
        raise CheckpointError(f"{path}: {TRACKER} names {os.path.basename(it_dir)}, which does not exist")
    if not detect_format(it_dir):
        raise CheckpointError(f"{it_dir}: neither torch_dist (metadata.json) nor torch (mp_rank_*) files")
    return it_dir


def open_checkpoint(path: str) -> CheckpointView:
    it_dir = find_iteration_dir(path)
    fmt = detect_format(it_dir)
    if fmt == "torch_dist":
        from megagrow.checkpoint.dcp_stream import TorchDistView
        view = TorchDistView(it_dir)
    else:
        from megagrow.checkpoint.legacy_stream import TorchView
        view = TorchView(it_dir)
    view.format = fmt
    return view


class VocabResized(DerivedView):
    """A view whose embedding/output rows are padded (or unpadded) for a target TP."""

    def __init__(self, inner: CheckpointView, rows: int):
        super().__init__(inner)
        self.rows = rows

    def read_globals(self) -> Unit:
        unit = self.inner.read_globals()
        for tensors in unit.values():
            for name in ("embedding.word_embeddings.weight", "output_layer.weight"):
                if name in tensors:
                    tensors[name] = resize_vocab_rows(tensors[name], self.rows)
        return unit


def refuse_same_directory(load: str, save: str) -> None:
    if os.path.abspath(load) == os.path.abspath(save):
        raise CheckpointError("--load and --save name the same directory; the source is never modified")


def target_args(args, tp: int, pp: int, fmt: str, with_optimizer: bool):
    new = copy.deepcopy(args)
    dp = getattr(args, "data_parallel_size", 1) or 1
    new.tensor_model_parallel_size, new.pipeline_model_parallel_size = tp, pp
    new.world_size = tp * pp * dp
    new.ckpt_format = fmt
    new.padded_vocab_size = vocab_rows(args, tp)
    if pp != args.pipeline_model_parallel_size:  # uneven stages were for the old pipeline
        new.decoder_first_pipeline_num_layers = new.decoder_last_pipeline_num_layers = None
    return new


class Progress:
    """One self-rewriting stderr line: units done, rate, elapsed."""

    def __init__(self, total: int, label: str, enabled: bool = True):
        self.total, self.label, self.enabled, self.t0 = total, label, enabled and total > 0, time.time()

    def __call__(self, done: int) -> None:
        if not self.enabled:
            return
        width = 30
        fill = int(width * done / self.total)
        rate = done / max(time.time() - self.t0, 1e-9)
        sys.stderr.write(f"\r{self.label} [{'#' * fill}{'.' * (width - fill)}] {done}/{self.total} layers "
                         f"{time.time() - self.t0:6.1f}s ({rate:.2f} layers/s)")
        if done == self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def _check_target(save: str, force: bool) -> None:
    if os.path.exists(save) and not os.path.isdir(save):
        raise CheckpointError(f"--save {save}: exists and is not a directory")
    if os.path.isdir(save) and os.listdir(save) and not force:
        raise CheckpointError(f"--save {save}: directory exists and is not empty (pass --force to replace it)")


def write_checkpoint(view: CheckpointView, save: str, args, fmt: str, with_optimizer: bool,
                     force: bool = False, progress: bool = True, label: str = "writing",
                     copy_chunks: bool = False, layer_map: list[int] | None = None) -> str:
    """Write `view` under `save` (`iter_N/` + tracker) via a temporary sibling renamed at the end."""
    if fmt not in FORMATS:
        raise CheckpointError(f"--ckpt-format {fmt}: expected one of {', '.join(FORMATS)}")
    _check_target(save, force)
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    check_target_parallelism(args, tp, pp)
    partial = save.rstrip("/") + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    it_dir = iteration_dir(partial, view.iteration)
    bar = Progress(args.num_layers, label, progress)
    try:
        if copy_chunks:  # torch_dist to torch_dist, tensors unchanged: see dcp_stream.copy_torch_dist
            from megagrow.checkpoint.dcp_stream import copy_torch_dist
            copy_torch_dist(view, it_dir, args, with_optimizer, bar, layer_map)
        elif fmt == "torch_dist":
            from megagrow.checkpoint.dcp_stream import write_torch_dist
            write_torch_dist(view, it_dir, args, tp, pp, with_optimizer, bar)
        else:
            from megagrow.checkpoint.legacy_stream import write_torch
            os.makedirs(it_dir)
            write_torch(view, it_dir, args, tp, pp, with_optimizer, bar)
        with open(os.path.join(partial, TRACKER), "w") as f:
            f.write(str(view.iteration) if view.iteration else "release")
        if os.path.exists(save):
            old = save.rstrip("/") + ".old"
            os.replace(save, old)
            os.replace(partial, save)
            shutil.rmtree(old)
        else:
            os.replace(partial, save)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    finally:
        view.close()
    return iteration_dir(save, view.iteration)


def convert(load: str, save: str, target_tp: int | None = None, target_pp: int | None = None,
            fmt: str | None = None, with_optimizer: bool = True, force: bool = False,
            progress: bool = True, rechunk: bool = False) -> str:
    """Rewrite a checkpoint at another TP/PP and/or format.

    torch_dist to torch_dist copies the stored chunks byte for byte (they hold global coordinates,
    valid at any parallelism) unless `rechunk` asks for the chunks the target ranks would write.
    """
    refuse_same_directory(load, save)
    view = open_checkpoint(load)
    check_source(view, with_optimizer)
    src = view.args
    tp = target_tp or src.tensor_model_parallel_size
    pp = target_pp or src.pipeline_model_parallel_size
    fmt = fmt or view.format
    args = target_args(src, tp, pp, fmt, with_optimizer)
    # dp_reshardable's flat optimizer buckets are not per-parameter chunks: stream those checkpoints
    copy_chunks = view.format == fmt == "torch_dist" and not rechunk and not view.dp_reshardable
    return write_checkpoint(view if copy_chunks else VocabResized(view, args.padded_vocab_size), save, args, fmt,
                            with_optimizer and view.optimizer is not None, force, progress,
                            label=f"converting TP{src.tensor_model_parallel_size}/PP"
                                  f"{src.pipeline_model_parallel_size} -> TP{tp}/PP{pp}", copy_chunks=copy_chunks)


def check_source(view: CheckpointView, with_optimizer: bool) -> None:
    """Refuse an incomplete or inconsistent source before anything is written."""
    problems = _problems(view)
    if problems:
        raise CheckpointError(problems[0] + (f" (and {len(problems) - 1} more problems; see "
                                             f"megagrow checkpoint inspect)" if len(problems) > 1 else ""))
    if with_optimizer and getattr(view, "unsupported_optimizer", None):
        raise CheckpointError(f"{view.path}: cannot carry {view.unsupported_optimizer}; pass --no-optimizer")


def directory_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def inspect(path: str) -> dict:
    """What a checkpoint holds and whether it is complete; problems are listed, not raised."""
    it_dir = find_iteration_dir(path)
    fmt = detect_format(it_dir)
    info = {"path": it_dir, "format": fmt, "size_bytes": directory_bytes(it_dir)}
    try:
        view = open_checkpoint(path)
    except CheckpointError as e:
        return {**info, "complete": False, "problems": [str(e)]}
    a = view.args
    info.update({
        "iteration": view.iteration,
        "tensor_model_parallel_size": a.tensor_model_parallel_size,
        "pipeline_model_parallel_size": a.pipeline_model_parallel_size,
        "model": {"num_layers": a.num_layers, "hidden_size": a.hidden_size, "ffn_hidden_size": a.ffn_hidden_size,
                  "num_attention_heads": a.num_attention_heads, "num_query_groups": query_groups(a),
                  "swiglu": bool(getattr(a, "swiglu", False)), "normalization": getattr(a, "normalization", None),
                  "tied_embeddings": tied(a), "padded_vocab_size": a.padded_vocab_size},
        "parameters": parameter_count(a),
        "optimizer": (None if view.optimizer is None else
                      ("distributed" if view.optimizer.distributed else "plain") + f" adam, step {view.optimizer.step:g}"),
    })
    problems = _problems(view)
    view.close()
    info.update({"complete": not problems, "problems": problems})
    return info


def _problems(view: CheckpointView) -> list[str]:
    glob, layer = expected_shapes(view.args)
    found = []
    if view.format == "torch_dist":
        found += view.problems()
        for key, md in view.tensors.items():
            name = key.split(".", 3)[3] if key.startswith("optimizer.state.") else key
            if name.startswith("decoder.layers."):
                rel = name[len("decoder.layers."):]
                want = (view.num_layers,) + layer[rel] if rel in layer else None
            else:
                want = glob.get(name)
            if want is None:
                found.append(f"unknown key {key}")
            elif tuple(md.size) != want:
                found.append(f"{key}: shape {tuple(md.size)}, the args say {want}")
        return [f"{view.path}: {p}" for p in found]
    from megagrow.checkpoint.legacy_stream import check_shards
    return check_shards(view, glob, layer)
