"""The trainer's checkpoints, in Megatron-LM's layout and formats, written so a crash never loses one.

Layout (as Megatron-LM): `<dir>/iter_0000100/` holding dist_checkpointing's files (`.metadata`,
`__R_I.distcp`, `common.pt`, `metadata.json`) for torch_dist, or `mp_rank_TT[_PPP]/model_optim_rng.pt`
per (TP, PP) rank for the legacy torch format, and `<dir>/latest_checkpointed_iteration.txt`.
torch_dist reloads at any parallelism; the torch format only at its own (convert it otherwise).
A save goes to `iter_0000100.tmp/`, is renamed once every rank has finished, and only then is
the tracker file replaced (atomically). A job killed mid-save leaves the previous checkpoint and
tracker untouched; the stale `.tmp` directory is removed by the next save.
"""

from __future__ import annotations

import os
import random
import shutil

import numpy as np
import torch
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.serialization import (get_default_load_sharded_strategy,
                                                            get_default_save_sharded_strategy)
from megatron.core.dist_checkpointing.strategies.fully_parallel import (FullyParallelLoadStrategyWrapper,
                                                                        FullyParallelSaveStrategyWrapper)

from torch.distributed.checkpoint import FileSystemReader

from megagrow.checkpoint.dcp_stream import COMMON_PT, read_common_state, written_content_metadata
from megagrow.checkpoint.errors import TRACKER, CheckpointError, iteration_dir, read_tracker
from megagrow.checkpoint.io import detect_format
from megagrow.checkpoint.legacy_stream import SHARD_FILE, load_shard, rank_dir
from megagrow.checkpoint.view import RUN_STATE_KEY, run_state
from megagrow.model.shape import padded_vocab_size, qkv_bias, zero_centered_gamma
from megagrow.runtime.distributed import print_rank_0
from megagrow.runtime.versions import READS_COMMON_STATE_IN_DCP, collect_write_results_in_process

CHECKPOINT_VERSION = 3.0
# Architecture fields a checkpoint must agree on to be loaded into a model (parallelism may differ).
MODEL_SHAPE_ARGS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
                    "swiglu", "normalization", "position_embedding_type", "untie_embeddings_and_output_weights",
                    "add_bias_linear", "add_qkv_bias", "qk_layernorm", "layernorm_zero_centered_gamma")
_FLAG_NAMES = {"layernorm_zero_centered_gamma": "--apply-layernorm-1p"}  # flags whose dest is not their name
# Fields that args which do not record them (older checkpoints) still determine.
_DERIVABLE = ("kv_channels", "add_qkv_bias", "qk_layernorm", "layernorm_zero_centered_gamma")


def _rng_state() -> dict:
    """This rank's RNG streams under Megatron-LM's key names (on CPU, the 'cuda' state is the CPU one)."""
    return {"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
            "torch_rng_state": torch.get_rng_state(), "cuda_rng_state": torch.cuda.get_rng_state(),
            "rng_tracker_states": tensor_parallel.get_cuda_rng_tracker().get_states()}


def _rng_state_object() -> ShardedObject:
    """Megatron-LM's layout: one object per (PP, TP) rank holding a one-element list; the data-parallel
    ranks are its replicas (they share the model-parallel streams)."""
    pp, tp = (parallel_state.get_pipeline_model_parallel_world_size(),
              parallel_state.get_tensor_model_parallel_world_size())
    offset = (parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_tensor_model_parallel_rank())
    return ShardedObject("rng_state", [_rng_state()], (pp, tp), offset,
                         replica_id=parallel_state.get_data_parallel_rank())


def _rng_key() -> str:
    """The stored key of this rank's RNG object (dist_checkpointing's `key/shard_<offset>_<shape>`)."""
    o = _rng_state_object()
    return f"rng_state/shard_{'.'.join(map(str, o.global_offset))}_{'.'.join(map(str, o.global_shape))}"


def _set_rng_state(states: list) -> None:
    state = states[0]
    random.setstate(state["random_rng_state"])
    np.random.set_state(state["np_rng_state"])
    torch.set_rng_state(state["torch_rng_state"])
    if torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_rng_state"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["rng_tracker_states"])


def _loaded_content_metadata(common: dict, stored_keys) -> dict:
    """The checkpoint's content_metadata; for one saved without it, what its keys show."""
    meta = common.get("content_metadata")
    if meta is not None:
        return meta
    dp_sharded = any(k.startswith("optimizer.distributed.") for k in stored_keys)
    return written_content_metadata(True, "dp_reshardable" if dp_sharded else "fully_reshardable")


def model_keys(model) -> dict[str, object]:
    """Megatron-LM's state-dict key of each model chunk: "model", or model0, model1, ... with a virtual
    pipeline (`model`: one DDP-wrapped chunk or the list of them)."""
    chunks = model if isinstance(model, list) else [model]
    return {"model": chunks[0]} if len(chunks) == 1 else {f"model{i}": c for i, c in enumerate(chunks)}


def _sharded_state_dict(model, optimizer, scheduler, args, iteration: int, metadata: dict,
                        is_loading: bool, with_optimizer: bool = True, with_rng: bool = True,
                        run_state: dict | None = None) -> dict:
    # Sharded keys are global (layer offsets include the chunk's), so any layout reads them.
    model_sd = {key: chunk.module.sharded_state_dict(metadata=metadata) for key, chunk in model_keys(model).items()}
    state = {**model_sd, "checkpoint_version": CHECKPOINT_VERSION, "iteration": iteration,
             "args": args, "num_floating_point_operations_so_far": getattr(args, "num_floating_point_operations_so_far", 0),
             RUN_STATE_KEY: run_state or {}}
    if with_optimizer and optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=metadata)
        state["opt_param_scheduler"] = scheduler.state_dict()
    if with_rng:
        state["rng_state"] = _rng_state_object()
    return state


def _write_torch_dist(tmp: str, iteration: int, model, optimizer, scheduler, args, run_state: dict) -> None:
    # fully_reshardable by default (Megatron-LM's --dist-ckpt-optim-fully-reshardable): loadable at any
    # TP/PP/DP, with or without the distributed optimizer.
    meta = written_content_metadata(args.use_distributed_optimizer,
                                    getattr(args, "dist_ckpt_optim_sharding", "fully_reshardable"))
    state = _sharded_state_dict(model, optimizer, scheduler, args, iteration, meta, is_loading=False,
                                run_state=run_state, with_optimizer=not getattr(args, "no_save_optim", False),
                                with_rng=not getattr(args, "no_save_rng", False))
    collect_write_results_in_process()
    dist_checkpointing.save(state, tmp, sharded_strategy=_save_strategy(args), content_metadata=meta)


def _save_strategy(args):
    """Megatron-LM's: replicated tensors' writes spread over data-parallel ranks unless
    --no-ckpt-fully-parallel-save."""
    strategy = get_default_save_sharded_strategy("torch_dist")
    if getattr(args, "ckpt_fully_parallel_save", True) and parallel_state.get_data_parallel_world_size() > 1:
        strategy = FullyParallelSaveStrategyWrapper(strategy, parallel_state.get_data_parallel_group(),
                                                    getattr(args, "ckpt_assume_constant_structure", False))
    return strategy


def _load_strategy(args, path: str):
    strategy = get_default_load_sharded_strategy(path)
    if getattr(args, "ckpt_fully_parallel_load", False) and parallel_state.get_data_parallel_world_size() > 1:
        strategy = FullyParallelLoadStrategyWrapper(strategy, parallel_state.get_data_parallel_group())
    return strategy


def _write_torch(tmp: str, iteration: int, model, optimizer, scheduler, args, run_state: dict) -> None:
    """Megatron-LM's legacy format: one file per (TP, PP) rank, written by data-parallel rank 0."""
    if parallel_state.get_data_parallel_rank() != 0:
        return
    d = os.path.join(tmp, rank_dir(parallel_state.get_tensor_model_parallel_rank(),
                                   parallel_state.get_pipeline_model_parallel_rank(),
                                   parallel_state.get_pipeline_model_parallel_world_size()))
    os.makedirs(d)
    state = {"args": args, "checkpoint_version": CHECKPOINT_VERSION, "iteration": iteration,
             **{key: chunk.module.state_dict() for key, chunk in model_keys(model).items()},
             **({} if getattr(args, "no_save_optim", False) else
                {"optimizer": optimizer.state_dict(), "opt_param_scheduler": scheduler.state_dict()}),
             **({} if getattr(args, "no_save_rng", False) else {"rng_state": [_rng_state()]}),
             "num_floating_point_operations_so_far": getattr(args, "num_floating_point_operations_so_far", 0),
             RUN_STATE_KEY: run_state}
    torch.save(state, os.path.join(d, SHARD_FILE))


def save_checkpoint(root: str, iteration: int, model, optimizer, scheduler, args, run_state: dict) -> str:
    """Save on every rank (collective) in --ckpt-format, with megagrow's run state (view.run_state);
    returns the final iteration directory."""
    final = iteration_dir(root, iteration)
    tmp = final + ".tmp"
    rank = torch.distributed.get_rank()
    if rank == 0:
        if os.path.exists(tmp):  # left by a run killed while saving
            shutil.rmtree(tmp)
        os.makedirs(tmp)
    torch.distributed.barrier()
    write = _write_torch if args.ckpt_format == "torch" else _write_torch_dist
    write(tmp, iteration, model, optimizer, scheduler, args, run_state)
    torch.distributed.barrier()
    if rank == 0:
        if os.path.exists(final):  # re-saving an iteration: keep the old one until the new one is in place
            os.replace(final, final + ".old")
        os.replace(tmp, final)
        shutil.rmtree(final + ".old", ignore_errors=True)
        tracker_tmp = os.path.join(root, TRACKER + ".tmp")
        with open(tracker_tmp, "w") as f:
            f.write(str(iteration))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tracker_tmp, os.path.join(root, TRACKER))
    torch.distributed.barrier()
    return final


def _derived(a, name: str):
    """A shape field as the model uses it: Megatron-LM records derived values (kv_channels = hidden /
    heads, num_query_groups = 1 without GQA), megagrow's own older args may leave them unset."""
    value = getattr(a, name, None)
    if name == "kv_channels" and value is None:
        return a.hidden_size // a.num_attention_heads
    if name == "num_query_groups" and not getattr(a, "group_query_attention", True):
        return a.num_attention_heads
    if name == "add_qkv_bias":
        return qkv_bias(a)
    if name == "layernorm_zero_centered_gamma":
        return zero_centered_gamma(a)
    if name == "qk_layernorm":
        return bool(value)
    return value


def _check_compatible(saved_args, args, path: str) -> None:
    for name in MODEL_SHAPE_ARGS:
        if getattr(saved_args, name, None) is None and name not in _DERIVABLE:
            continue
        saved, wanted = _derived(saved_args, name), _derived(args, name)
        if saved != wanted:
            flag = _FLAG_NAMES.get(name, "--" + name.replace("_", "-"))
            raise CheckpointError(f"{path}: checkpoint has {flag} {saved}, this run asks for {wanted}")
    _check_vocabulary(saved_args, args, path)


def _check_vocabulary(saved_args, args, path: str) -> None:
    """The run's tokenizer must give the checkpoint's vocabulary (else its rows mean other tokens)."""
    saved_vocab = getattr(saved_args, "tokenizer_vocab_size", None)
    if saved_vocab is not None:
        same = saved_vocab == args.tokenizer_vocab_size
    elif getattr(saved_args, "padded_vocab_size", None) is not None:  # Megatron-LM's: compare padded sizes
        saved_vocab = saved_args.padded_vocab_size
        same = saved_vocab == padded_vocab_size(args.tokenizer_vocab_size, saved_args.make_vocab_size_divisible_by,
                                                saved_args.tensor_model_parallel_size)
    else:
        return
    if not same:
        saved_type = getattr(saved_args, "tokenizer_type", "?")
        raise CheckpointError(
            f"{path}: checkpoint vocabulary {saved_vocab} ({saved_type}) does not match this run's tokenizer "
            f"({args.tokenizer_type}, {args.tokenizer_vocab_size} tokens): use the checkpoint's --tokenizer-type "
            f"and --tokenizer-model")


def _load_torch_dist(path: str, model, optimizer, scheduler, args, iteration: int, same_layout: bool):
    if not (READS_COMMON_STATE_IN_DCP or os.path.isfile(os.path.join(path, COMMON_PT))):
        raise CheckpointError(f"{path}: written by megatron-core 0.19 or later (no {COMMON_PT}), which this "
                              f"megatron-core cannot load: convert it first (megagrow checkpoint convert)")
    common = read_common_state(path)  # either layout
    saved_args = common.get("args")
    _check_compatible(saved_args, args, path)
    # The optimizer lives in the sharded part; its scheduler's state in common.pt marks that it was saved.
    load_optim = not (args.no_load_optim or args.finetune) and "opt_param_scheduler" in common
    # RNG streams belong to a layout; a converted checkpoint has none.
    stored = FileSystemReader(path).read_metadata().state_dict_metadata
    has_rng = _rng_key() in stored
    load_rng = not (args.no_load_rng or args.finetune) and same_layout(saved_args) and has_rng
    if load_optim:
        _materialize_optimizer_state(optimizer)
    state = _sharded_state_dict(model, optimizer, scheduler, args, iteration, _loaded_content_metadata(common, stored),
                                is_loading=True, with_optimizer=load_optim, with_rng=load_rng)
    loaded = dist_checkpointing.load(state, path, sharded_strategy=_load_strategy(args, path),
                                     strict=getattr(args, "dist_ckpt_strictness", "assume_ok_unexpected"))
    if isinstance(loaded, tuple):  # --dist-ckpt-strictness return_*: (state, missing keys, unexpected keys)
        loaded, missing, unexpected = loaded
        print_rank_0(f" checkpoint keys the model lacks: {sorted(unexpected)}; missing: {sorted(missing)}")
    for key, chunk in model_keys(model).items():
        chunk.module.load_state_dict(loaded[key])
    if load_optim:
        with torch.no_grad():  # the dp_reshardable restore copies into parameter views in place
            optimizer.load_state_dict(loaded["optimizer"])
        _restore_adam_steps(optimizer)
        scheduler.load_state_dict(loaded["opt_param_scheduler"])
    if load_rng:
        _set_rng_state(loaded["rng_state"])
    return common, saved_args


def _materialize_optimizer_state(optimizer) -> None:
    """Give a fresh distributed optimizer its state tensors so that they can be loaded into.

    Without Apex/TE its state_dict() needs Adam's per-parameter 'step', which exists only after a
    step; megatron-core fills dummy states the same way for its FSDP checkpoints. The dummy step
    changes parameters, which the load then overwrites.
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not hasattr(opt, "_init_optimizer_states_with_dummy_values"):
            continue  # not the distributed optimizer
        if not opt.optimizer.state:
            opt._init_optimizer_states_with_dummy_values()
        if not getattr(opt, "_megagrow_step_patch", False):
            _keep_torch_adam_step(opt)


def _restore_adam_steps(optimizer) -> None:
    """Give every parameter of torch's Adam (no Apex/TE) its own, correct 'step' after a load.

    megatron-core's distributed optimizer keeps the step in its param groups. Its fully_reshardable
    restore puts one tensor object into every parameter's state (torch's Adam increments each in
    place, so a shared one would advance once per parameter per iteration); its dp_reshardable
    restore leaves the dummy step of `_materialize_optimizer_state` in place (Megatron-LM's own
    resume then loses the bias correction: its losses after the first step differ from an
    uninterrupted run)."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        for group in getattr(inner, "param_groups", []):
            for param in group["params"]:
                state = inner.state.get(param, {})
                if not isinstance(state.get("step"), torch.Tensor):
                    continue
                step = state["step"].clone()
                if "step" in group:
                    step.fill_(group["step"])
                state["step"] = step


def _keep_torch_adam_step(opt) -> None:
    """megatron-core 0.16 restores fully_reshardable state into torch's Adam (no Apex/TE) by copying
    every per-parameter state entry, 'step' included, from tensors that never carry 'step' (it is
    stored once per group and already set by load_state_dict): pass the current step through."""
    restore = opt._set_main_param_and_optimizer_states

    def set_states(model_param, tensors):
        group_index, group_order = opt.model_param_group_index_map[model_param]
        state = opt.optimizer.state[opt.optimizer.param_groups[group_index]["params"][group_order]]
        if "step" in state and "step" not in tensors:
            tensors = {**tensors, "step": state["step"]}
        restore(model_param, tensors)

    opt._set_main_param_and_optimizer_states = set_states
    opt._megagrow_step_patch = True


def _load_torch(path: str, model, optimizer, scheduler, args, iteration: int, same_layout):
    f = os.path.join(path, rank_dir(parallel_state.get_tensor_model_parallel_rank(),
                                    parallel_state.get_pipeline_model_parallel_rank(),
                                    parallel_state.get_pipeline_model_parallel_world_size()), SHARD_FILE)
    state = load_shard(f)
    saved_args = state.get("args")
    _check_compatible(saved_args, args, path)
    for n in ("tensor_model_parallel_size", "pipeline_model_parallel_size"):
        if getattr(saved_args, n) != getattr(args, n):
            flag = "--" + n.replace("_", "-")
            raise CheckpointError(f"{path}: a torch-format checkpoint saved with {flag} {getattr(saved_args, n)} "
                                  f"loads only at that size (convert it: megagrow checkpoint convert)")
    for n in ("virtual_pipeline_model_parallel_size",):
        if getattr(saved_args, n, None) != getattr(args, n, None):
            raise CheckpointError(f"{path}: a torch-format checkpoint saved with {getattr(saved_args, n, None) or 1} "
                                  f"model chunks per pipeline rank loads only with as many (convert it: megagrow "
                                  f"checkpoint convert)")
    for key, chunk in model_keys(model).items():
        chunk.module.load_state_dict(state[key])
    if not (args.no_load_optim or args.finetune) and state.get("optimizer"):
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["opt_param_scheduler"])
    if not (args.no_load_rng or args.finetune) and same_layout(saved_args) and state.get("rng_state"):
        _set_rng_state(state["rng_state"])
    return state, saved_args


def load_checkpoint(root: str, model, optimizer, scheduler, args) -> tuple[int, int, dict]:
    """Load the tracker's checkpoint (either format) into model, optimizer, scheduler and RNG unless told not to.

    Returns (iteration, consumed_train_samples, run state); (0, 0, empty state) when there is nothing to load.
    """
    iteration = read_tracker(root)
    if iteration is None:
        return 0, 0, run_state({}, args)
    path = iteration_dir(root, iteration)

    def same_layout(saved_args):
        return all(getattr(saved_args, n, None) == getattr(args, n) for n in
                   ("tensor_model_parallel_size", "pipeline_model_parallel_size", "data_parallel_size"))

    load = _load_torch_dist if detect_format(path) == "torch_dist" else _load_torch
    common, saved_args = load(path, model, optimizer, scheduler, args, iteration, same_layout)
    if args.finetune:
        return 0, 0, run_state({}, args)
    args.num_floating_point_operations_so_far = common.get("num_floating_point_operations_so_far", 0)
    consumed = getattr(saved_args, "consumed_train_samples", iteration * saved_args.global_batch_size)
    return iteration, consumed, run_state(common, saved_args)

