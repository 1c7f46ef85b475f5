"""Checkpoint I/O: open any supported checkpoint as a view, write a view atomically, validate.

Each format is one reader/writer module registered here (`FORMATS`): how to recognise an iteration
directory, the view class that reads it (and lists its own problems), and the function that writes
a view in it. `write_checkpoint` writes any view (a reader, or a growth operator's view of one) through
checkpoint.target (the one place that decides where a checkpoint may be written), validates it as
`inspect` would, and only then renames it into place: a source is never touched, a failed write
leaves nothing behind, and what lands is always loadable.
"""

from __future__ import annotations

import copy
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable

from megagrow.checkpoint import dcp_stream, hf_stream, legacy_stream
from megagrow.checkpoint.errors import TRACKER, CheckpointError, iteration_dir, read_tracker
from megagrow.checkpoint.target import check_target, writing
from megagrow.checkpoint.view import CheckpointView, DerivedView, Unit, check_target_parallelism, vocab_rows
from megagrow.model.layout import resize_vocab_rows
from megagrow.model.shape import ModelShape, parameter_count, qkv_bias, shape_problems
from megagrow.registry import Registry


@dataclass(frozen=True)
class CheckpointFormat:
    name: str
    detect: Callable[[str], bool]  # does this iteration directory hold a checkpoint of the format (cheap)
    open: Callable[[str], CheckpointView]  # iteration directory -> view; raises CheckpointError
    write: Callable | None  # (view, iteration dir, args, tp, pp, with_optimizer, progress) -> None; None: read only


FORMATS: Registry[CheckpointFormat] = Registry("checkpoint format", CheckpointError)
FORMATS.register("torch_dist", CheckpointFormat("torch_dist", dcp_stream.is_torch_dist, dcp_stream.TorchDistView,
                                                dcp_stream.write_torch_dist))
FORMATS.register("torch", CheckpointFormat("torch", legacy_stream.is_torch, legacy_stream.TorchView,
                                           legacy_stream.write_torch))
# A Hugging Face model directory reads as a checkpoint; it is written by `checkpoint export` (checkpoint/export.py).
FORMATS.register("hf", CheckpointFormat("hf", hf_stream.is_hf, hf_stream.HFView, None))


def detect_format(it_dir: str) -> str | None:
    """The registered format of one iteration directory, or None."""
    return next((f.name for f in FORMATS.values() if f.detect(it_dir)), None)


def writable_format(view: CheckpointView) -> str:
    """A view's own format when megagrow writes it, else torch_dist (a Hugging Face model's default target)."""
    return view.format if FORMATS.get(view.format).write is not None else "torch_dist"


def find_iteration_dir(path: str, flag: str = "") -> str:
    """A checkpoint root (with the tracker file) or one iteration directory -> the iteration directory."""
    where = f"{flag} {path}" if flag else path
    if not os.path.isdir(path):
        raise CheckpointError(f"{where}: no such directory")
    if detect_format(path):
        return path
    iteration = read_tracker(path)
    if iteration is None:
        raise CheckpointError(f"{where}: not a checkpoint (no {TRACKER} and no checkpoint files)")
    it_dir = iteration_dir(path, iteration)
    if not os.path.isdir(it_dir):
        raise CheckpointError(f"{where}: {TRACKER} names {os.path.basename(it_dir)}, which does not exist")
    if not detect_format(it_dir):
        raise CheckpointError(f"{where}: {it_dir} holds no checkpoint of a known format ({', '.join(FORMATS)})")
    return it_dir


def check_loadable(root: str, same_as_save: bool = False) -> None:
    """Fail fast on a --load that is not a checkpoint directory.

    `--load X --save X` on a fresh X is Megatron's requeue pattern: allowed, it starts from scratch.
    """
    if same_as_save and (not os.path.exists(root) or (os.path.isdir(root) and not os.listdir(root))):
        return
    if os.path.isdir(root) and read_tracker(root) is None:
        raise CheckpointError(f"--load {root}: not a checkpoint directory (no {TRACKER})")
    find_iteration_dir(root, "--load")


def open_checkpoint(path: str) -> CheckpointView:
    it_dir = find_iteration_dir(path)
    return FORMATS.get(detect_format(it_dir)).open(it_dir)


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

    def placements(self, index: int | None) -> dict:
        placed = self.inner.placements(index)
        return {name: p for name, p in placed.items() if name not in dcp_stream.VOCAB_TENSORS or p.shape[0] == self.rows}


def target_args(args, tp: int, pp: int, fmt: str, vpp: int | None = None):
    """The source's args as the target's: its parallelism (`vpp` model chunks per pipeline rank; default the
    source's at the same PP, else one), format and vocabulary padding."""
    new = copy.deepcopy(args)
    source_vpp = getattr(args, "virtual_pipeline_model_parallel_size", None)
    vpp = vpp or (source_vpp if pp == args.pipeline_model_parallel_size else None)
    new.virtual_pipeline_model_parallel_size = vpp if vpp and vpp > 1 else None
    new.num_virtual_stages_per_pipeline_rank = new.virtual_pipeline_model_parallel_size
    new.num_layers_per_virtual_pipeline_stage = None
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


def written_bytes(args, with_optimizer: bool) -> int:
    """A low estimate of a checkpoint's size (bf16 weights, fp32 Adam moments): checked against free space."""
    return parameter_count(args) * (2 + (8 if with_optimizer else 0))


def validate_written(root: str, args, save: str) -> None:
    """A checkpoint megagrow writes is one it can read back whole, at the shape and layout it meant."""
    view = open_checkpoint(root)
    try:
        tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
        problems = view.problems() + shape_problems(view.args, tp, pp)
        if view.num_layers != args.num_layers or view.args.hidden_size != args.hidden_size:
            problems.append(f"it holds {view.num_layers} layers of width {view.args.hidden_size}, "
                            f"not {args.num_layers} of {args.hidden_size}")
    finally:
        view.close()
    if problems:
        raise CheckpointError(f"the checkpoint written for --save {save} does not validate ({problems[0]}); "
                              "nothing was written")


def write_checkpoint(view: CheckpointView, save: str, args, fmt: str, with_optimizer: bool,
                     force: bool = False, progress: bool = True, label: str = "writing",
                     copy_chunks: bool = False, layer_map: list[int] | None = None, load: str | None = None) -> str:
    """Write `view` under `save` (`iter_N/` + tracker): to a partial sibling, validated, then renamed."""
    writer = FORMATS.get(fmt, "--ckpt-format: ").write
    if writer is None:
        raise CheckpointError(f"--ckpt-format {fmt}: megagrow reads it but writes Megatron checkpoints as torch_dist "
                              "or torch (a Hugging Face model: megagrow checkpoint export)")
    target = check_target(save, force, load)
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    check_target_parallelism(args, tp, pp)
    bar = Progress(args.num_layers, label, progress)
    try:
        with writing(target, written_bytes(args, with_optimizer)) as partial:
            it_dir = iteration_dir(partial, view.iteration)
            if copy_chunks:  # torch_dist to torch_dist, tensors unchanged: see dcp_stream.copy_torch_dist
                dcp_stream.copy_torch_dist(view, it_dir, args, with_optimizer, bar, layer_map)
            else:
                os.makedirs(it_dir, exist_ok=True)
                writer(view, it_dir, args, tp, pp, with_optimizer, bar)
            with open(os.path.join(partial, TRACKER), "w") as f:
                f.write(str(view.iteration) if view.iteration else "release")
            validate_written(partial, args, save)
    finally:
        view.close()
    return iteration_dir(target.final, view.iteration)


def check_source(view: CheckpointView, with_optimizer: bool) -> None:
    """Refuse an incomplete or inconsistent source before anything is written."""
    problems = view.problems()
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
    info = {"path": it_dir, "format": detect_format(it_dir), "size_bytes": directory_bytes(it_dir)}
    try:
        view = open_checkpoint(path)
    except CheckpointError as e:
        return {**info, "complete": False, "problems": [str(e)]}
    a, shape = view.args, ModelShape.from_args(view.args)
    info.update({
        "iteration": view.iteration,
        "tensor_model_parallel_size": a.tensor_model_parallel_size,
        "pipeline_model_parallel_size": a.pipeline_model_parallel_size,
        "model": {"num_layers": shape.num_layers, "hidden_size": shape.hidden_size,
                  "ffn_hidden_size": shape.ffn_hidden_size, "num_attention_heads": shape.num_attention_heads,
                  "num_query_groups": shape.num_query_groups, "swiglu": shape.swiglu,
                  "normalization": getattr(a, "normalization", None),
                  "tied_embeddings": not shape.untie_embeddings_and_output_weights,
                  "qk_layernorm": shape.qk_layernorm, "qkv_bias": qkv_bias(a),
                  "zero_centered_gamma": shape.layernorm_zero_centered_gamma,
                  "rope_scaling_factor": getattr(a, "rope_scaling_factor", 8.0)
                  if getattr(a, "use_rope_scaling", False) else None,
                  "padded_vocab_size": a.padded_vocab_size},
        "parameters": parameter_count(a),
        "optimizer": (None if view.optimizer is None else
                      ("distributed" if view.optimizer.distributed else "plain") + f" adam, step {view.optimizer.step:g}"),
    })
    if view.format == "hf":  # what pretrain_gpt.py needs to train on from an import of it
        from megagrow.model.hf_layout import trainer_flags
        info["trainer_flags"] = trainer_flags(view.config)
    problems = view.problems()
    view.close()
    info.update({"complete": not problems, "problems": problems})
    return info
