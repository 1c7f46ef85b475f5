"""Streaming read and write of Megatron-LM's legacy `torch` checkpoint format.

`iter_N/mp_rank_TT[_PPP]/model_optim_rng.pt`, one torch.save per (TP, PP) rank, holding that rank's
`model` state dict (layer numbers local to its pipeline stage, key names of its layer spec) and its
optimizer's `state_dict()` (Adam state indexed by parameter position, see
layout.optimizer_param_groups). Files are opened memory-mapped, a pipeline stage's TP files at a
time, so reading holds one stage's shard files mapped and one layer in memory.
"""

from __future__ import annotations

import os
from collections import OrderedDict

import torch

from megagrow.checkpoint.errors import CheckpointError
from megagrow.checkpoint.view import (EXTRA_STATE_MODULES, LAYER_PREFIX, RUN_STATE_KEY, CheckpointView, OptimizerCommon,
                                      Unit, run_state)
from megagrow.model.layout import (fused_name, layer_param_order, optimizer_param_groups, pipeline_stages, spec_name,
                                   split_layer_key, tp_local_chunk, tp_partition_dim, tp_unshard)
from megagrow.model.shape import expected_shapes, gated, tied

SHARD_FILE = "model_optim_rng.pt"


def rank_dir(tp_rank: int, pp_rank: int, pp_size: int) -> str:
    return f"mp_rank_{tp_rank:02d}" + (f"_{pp_rank:03d}" if pp_size > 1 else "")


def load_shard(path: str) -> dict:
    if not os.path.isfile(path):
        raise CheckpointError(f"missing shard {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:  # a truncated zip archive, or not a torch file
        raise CheckpointError(f"unreadable shard {path} ({type(e).__name__}: {str(e).splitlines()[0]})") from None


def _stages(args):
    return pipeline_stages(args.num_layers, args.pipeline_model_parallel_size,
                           getattr(args, "decoder_first_pipeline_num_layers", None),
                           getattr(args, "decoder_last_pipeline_num_layers", None))


def _adam(opt) -> tuple[dict | None, list | None]:
    """(torch Adam state_dict, fp32 master copies per group) from a megatron optimizer state_dict."""
    if isinstance(opt, list):
        if len(opt) != 1:
            raise CheckpointError("chained optimizers with several parts are not supported")
        opt = opt[0]
    if not opt:
        return None, None
    if "state" in opt and "param_groups" in opt:
        return opt, None
    return opt.get("optimizer"), opt.get("fp32_from_fp16_params")


class TorchView(CheckpointView):
    format = "torch"
    dp_reshardable = False

    def __init__(self, iter_dir: str):
        self.path = iter_dir
        names = sorted(n for n in os.listdir(iter_dir) if n.startswith("mp_rank_"))
        if not names:
            raise CheckpointError(f"{iter_dir}: no mp_rank_* shard directories")
        first = load_shard(os.path.join(iter_dir, names[0], SHARD_FILE))
        args = first.get("args")
        if args is None:
            raise CheckpointError(f"{iter_dir}/{names[0]}/{SHARD_FILE} has no 'args'")
        self.tp, self.pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
        self.stages = _stages(args)
        missing = [rank_dir(t, p, self.pp) for p in range(self.pp) for t in range(self.tp)
                   if not os.path.isfile(os.path.join(iter_dir, rank_dir(t, p, self.pp), SHARD_FILE))]
        if missing:
            raise CheckpointError(f"{iter_dir}: missing shard {missing[0]}/{SHARD_FILE}")
        adam, fp32_groups = _adam(first.get("optimizer"))
        optimizer = None
        self.unsupported_optimizer = None
        if os.path.exists(os.path.join(iter_dir, names[0], "distrib_optim.pt")):
            self.unsupported_optimizer = "the distributed optimizer's distrib_optim.pt (torch format)"
        elif fp32_groups is not None:
            self.unsupported_optimizer = "the bf16/fp16 optimizer's fp32 master copies (torch format)"
        elif adam is not None and adam.get("state"):
            step = next(iter(adam["state"].values())).get("step", 0)
            optimizer = OptimizerCommon([{k: v for k, v in g.items() if k != "params"} for g in adam["param_groups"]],
                                        float(step), distributed=False)
        super().__init__(args=args, iteration=first.get("iteration", 0), optimizer=optimizer,
                         extra={**{k: first[k] for k in ("opt_param_scheduler", "num_floating_point_operations_so_far")
                                   if k in first}, RUN_STATE_KEY: run_state(first, args)})
        self._open: dict[tuple[int, int], dict] = {}

    def _shard(self, tp_rank: int, pp_rank: int) -> dict:
        if (tp_rank, pp_rank) not in self._open:
            if any(p != pp_rank for _, p in self._open):
                self._open.clear()  # keep one pipeline stage's files mapped
            path = os.path.join(self.path, rank_dir(tp_rank, pp_rank, self.pp), SHARD_FILE)
            sd = load_shard(path)
            if "model" not in sd and "model0" in sd:
                raise CheckpointError(f"{path}: virtual-pipeline torch-format checkpoints (model0, model1, ...) are "
                                      "not read by megagrow yet (Megatron-LM can save it as torch_dist)")
            sd["_by_name"] = _optimizer_by_name(sd, path, self.optimizer is not None)
            self._open[(tp_rank, pp_rank)] = sd
        return self._open[(tp_rank, pp_rank)]

    def _gather(self, pp_rank: int, select) -> Unit:
        """Unshard over TP every tensor `select(key)` names (returning the unit name, or None)."""
        shards: dict[tuple[str, str], list] = {}
        for t in range(self.tp):
            sd = self._shard(t, pp_rank)
            for key, value in sd["model"].items():
                name = select(key)
                if name is None or not isinstance(value, torch.Tensor):
                    continue
                shards.setdefault(("model", name), []).append(value)
                for state, tensor in sd["_by_name"].get(key, {}).items():
                    shards.setdefault((state, name), []).append(tensor)
        unit: Unit = {"model": {}}
        for (state, name), parts in shards.items():
            if len(parts) != self.tp:
                raise CheckpointError(f"{self.path}: {name} is missing on some TP ranks of stage {pp_rank}")
            try:
                full = tp_unshard(parts, name, gated(self.args))
            except RuntimeError as e:
                raise CheckpointError(f"{self.path}: inconsistent shapes of {name} across TP ranks ({e})") from None
            unit.setdefault(state, {})[name] = full.clone()
        return unit

    def read_globals(self) -> Unit:
        first = self._gather(0, lambda k: k if k.startswith("embedding.") and "_extra_state" not in k else None)
        last_stage = self.pp - 1
        wanted = ("decoder.final_layernorm.",) + (() if tied(self.args) else ("output_layer.weight",))
        last = self._gather(last_stage, lambda k: k if k.startswith(wanted) and "_extra_state" not in k else None)
        for state, tensors in last.items():
            first.setdefault(state, {}).update(tensors)
        return first

    def read_layer(self, index: int) -> Unit:
        stage = next(s for s, (start, n) in enumerate(self.stages) if start <= index < start + n)
        local = index - self.stages[stage][0]

        def select(key):
            split = split_layer_key(key)
            if split is None or split[0] != local or "_extra_state" in split[1]:
                return None
            return fused_name(split[1])

        return self._gather(stage, select)

    def close(self) -> None:
        self._open.clear()

    def problems(self) -> list[str]:
        return check_shards(self)


def _optimizer_by_name(sd: dict, path: str, wanted: bool) -> dict[str, dict[str, torch.Tensor]]:
    """{model key: {state: tensor}} for one rank, matching Adam's parameter indices to names."""
    adam, fp32_groups = _adam(sd.get("optimizer"))
    if not wanted or adam is None or not adam.get("state"):
        return {}
    params = [(k, tuple(v.shape)) for k, v in sd["model"].items()
              if isinstance(v, torch.Tensor) and "_extra_state" not in k]
    groups = optimizer_param_groups(params)
    saved = [g["params"] for g in adam["param_groups"]]
    if [len(g) for g in saved] != [len(g) for g in groups]:
        raise CheckpointError(f"{path}: optimizer groups hold {[len(g) for g in saved]} parameters, "
                              f"the model's parameters make {[len(g) for g in groups]}")
    shapes = dict(params)
    out = {}
    for g, (indices, names) in enumerate(zip(saved, groups)):
        for j, (index, name) in enumerate(zip(indices, names)):
            state = adam["state"].get(index, {})
            entry = {k: state[k] for k in ("exp_avg", "exp_avg_sq") if k in state}
            if fp32_groups is not None:
                entry["param"] = fp32_groups[g][j]
            if any(tuple(t.shape) != shapes[name] for t in entry.values()):
                raise CheckpointError(f"{path}: optimizer state of {name} does not match its shape {shapes[name]}")
            out[name] = entry
    return out


def write_torch(view: CheckpointView, out_dir: str, args, tp: int, pp: int, with_optimizer: bool,
                progress=None) -> None:
    """Write `view` in the legacy torch format at TP=tp, PP=pp, one rank file at a time."""
    if getattr(args, "virtual_pipeline_model_parallel_size", None):
        raise CheckpointError("--ckpt-format torch with virtual pipeline stages is not written by megagrow yet "
                              "(use torch_dist, or one model chunk per pipeline rank)")
    impl = getattr(args, "transformer_impl", None) or "local"
    with_optimizer = with_optimizer and view.optimizer is not None
    if with_optimizer and (set(view.optimizer_states) != {"exp_avg", "exp_avg_sq"} or impl != "local"):
        what = ("the transformer_engine spec" if impl != "local" else "the distributed optimizer"
                if view.optimizer.distributed else "an optimizer with fp32 master copies (bf16/fp16)")
        raise CheckpointError(f"--ckpt-format torch: optimizer state of {what} is not supported "
                              "(use --ckpt-format torch_dist, or --no-optimizer)")
    stages = _stages(args)
    g = gated(args)
    done = 0
    for s, (start, count) in enumerate(stages):
        for r in range(tp):
            model, optim = OrderedDict(), {}

            def put(key, unit, name):
                model[key] = tp_local_chunk(unit["model"][name], name, r, tp, g).clone()
                optim[key] = {st: tp_local_chunk(unit[st][name], name, r, tp, g).clone()
                              for st in view.optimizer_states if with_optimizer and name in unit.get(st, {})}

            glob = view.read_globals() if s in (0, pp - 1) else None
            if s == 0:
                for name in ("embedding.word_embeddings.weight", "embedding.position_embeddings.weight"):
                    if name in glob["model"]:
                        put(name, glob, name)
            for j in range(count):
                unit = view.read_layer(start + j)
                for rel in layer_param_order(args):
                    put(f"{LAYER_PREFIX}{j}.{spec_name(rel, impl)}", unit, rel)
                for module in EXTRA_STATE_MODULES:
                    model[f"{LAYER_PREFIX}{j}.{module}._extra_state"] = None
                del unit
                if r == tp - 1:
                    done += 1
                    if progress:
                        progress(done)
            if s == pp - 1:
                for name in ("decoder.final_layernorm.weight", "decoder.final_layernorm.bias"):
                    if name in glob["model"]:
                        put(name, glob, name)
                if not tied(args):
                    put("output_layer.weight", glob, "output_layer.weight")
                elif pp > 1:  # the last stage keeps its own copy of the tied embedding
                    put("output_layer.weight", glob, "embedding.word_embeddings.weight")
                model["output_layer._extra_state"] = None
            del glob
            state = {"args": args, "checkpoint_version": 3.0, "iteration": view.iteration, "model": model,
                     "num_floating_point_operations_so_far": view.extra.get("num_floating_point_operations_so_far", 0),
                     RUN_STATE_KEY: view.extra.get(RUN_STATE_KEY, {})}
            if with_optimizer:
                state["optimizer"] = _adam_state_dict(model, optim, view.optimizer)
                if "opt_param_scheduler" in view.extra:
                    state["opt_param_scheduler"] = view.extra["opt_param_scheduler"]
            d = os.path.join(out_dir, rank_dir(r, s, pp))
            os.makedirs(d)
            torch.save(state, os.path.join(d, SHARD_FILE))


def _adam_state_dict(model: dict, optim: dict, common: OptimizerCommon) -> dict:
    params = [(k, tuple(v.shape)) for k, v in model.items() if isinstance(v, torch.Tensor)]
    groups = optimizer_param_groups(params)
    state, param_groups, index = {}, [], 0
    for hyper, names in zip(common.param_groups, groups):
        indices = []
        for name in names:
            state[index] = {"step": torch.tensor(common.step), **optim[name]}
            indices.append(index)
            index += 1
        param_groups.append({**hyper, "params": indices})
    return {"state": state, "param_groups": param_groups}


def check_shards(view: TorchView) -> list[str]:
    """Every rank file loads and holds the tensors, of the local shapes, that the args call for."""
    glob, layer = expected_shapes(view.args)
    found = []
    for s, (start, count) in enumerate(view.stages):
        for t in range(view.tp):
            name = os.path.join(view.path, rank_dir(t, s, view.pp))
            try:
                sd = view._shard(t, s)
            except CheckpointError as e:
                found.append(str(e))
                continue
            for key, value in sd["model"].items():
                if not isinstance(value, torch.Tensor):
                    continue
                split = split_layer_key(key)
                if split is not None:
                    rel = fused_name(split[1])
                    want = layer.get(rel) if split[0] < count else None
                else:
                    rel = key
                    want = glob.get(key, glob.get("embedding.word_embeddings.weight") if key == "output_layer.weight"
                                    else None)
                if want is None:
                    found.append(f"{name}: unknown key {key}")
                    continue
                want = list(want)
                dim = tp_partition_dim(rel)
                if dim is not None:
                    want[dim] //= view.tp
                if list(value.shape) != want:
                    found.append(f"{name}: {key} has shape {tuple(value.shape)}, the args say {tuple(want)}")
    view.close()
    return found


def is_torch(it_dir: str) -> bool:
    return any(n.startswith("mp_rank_") for n in os.listdir(it_dir))
