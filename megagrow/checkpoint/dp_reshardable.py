"""The distributed optimizer's `dp_reshardable` state in torch_dist checkpoints.

Megatron-LM's default sharding for --use-distributed-optimizer saves the optimizer state the way
the optimizer holds it, not per parameter. Model-parallel rank i (tp_rank + TP * pp_rank, its rank
in megatron-core's TP x PP group) has ShardedObjects `optimizer.distributed.dp_group_idx_{i}.optimizer`
(the param groups, with 'step'), `...per_bucket_numel` and `...per_bucket_numel_unpadded`, and one
1-D tensor per grad-buffer bucket and state:
`optimizer.distributed.dp_group_idx_{i}.gbuf_idx_{g}.dtype_{(param_dtype, grad_dtype)}.bucket_idx_{b}.{state}`
(state: param = fp32 main copy, exp_avg, exp_avg_sq). A bucket is megatron-core DDP's flat buffer of
that rank's local (TP-sharded) parameters: reverse named_parameters() order, each parameter's start
rounded up to a multiple of 64 elements, a new bucket when the bucket size is reached or before a
shared embedding; the padding that ends a bucket is not stored.

megagrow's views present per-parameter, TP-merged state, as a `fully_reshardable` checkpoint stores it
under `optimizer.state.<state>.<name>`. This module rebuilds each parameter's slice of its bucket
from the model's shapes, checks it against the stored bucket lengths, reads only the slices a unit
needs and merges them over TP; checkpoints written from it are per-parameter (fully_reshardable).
"""

from __future__ import annotations

import math
import pickle

import torch
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex
from torch.distributed.checkpoint.planner import LoadPlan
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from megagrow.checkpoint.errors import CheckpointError
from megagrow.checkpoint.view import LAYER_PREFIX, Unit
from megagrow.model.layout import layer_param_order
from megagrow.model.shape import expected_shapes, gated, tied
from megagrow.model.layout import gpt_parameter_order, pipeline_stages, tp_partition_dim, tp_unshard

SHARDING = "dp_reshardable"
PREFIX = "optimizer.distributed."
PARAM_ALIGN = 64  # megatron-core starts each parameter of a bucket at a multiple of 64 elements
IMPLS = ("local", "transformer_engine")


def is_dp_reshardable(common_optimizer) -> bool:
    """Whether common.pt's 'optimizer' entry is the dp_reshardable one."""
    return isinstance(common_optimizer, dict) and common_optimizer.get("param_state_sharding_type") == SHARDING


def is_flat_key(key: str) -> bool:
    return key.startswith(PREFIX)


def _rank_prefix(rank: int) -> str:
    return f"{PREFIX}dp_group_idx_{rank}."


def _object(view, key: str):
    if key + "/shard_0_1" not in view.metadata.state_dict_metadata:
        raise CheckpointError(f"{view.path}: dp_reshardable optimizer state without {key}")
    return view.read_object(key + "/shard_0_1")


def param_groups(view) -> list[dict]:
    """The optimizer's param groups (with 'step'): dp_reshardable keeps them out of common.pt."""
    return _object(view, _rank_prefix(0) + "optimizer")["param_groups"]


class _IntoBoxes:
    """LoadPlanner for DCP's reader: each read box lands in the tensor made for its (key, offset)."""

    def __init__(self, targets: dict[MetadataIndex, torch.Tensor]):
        self.targets = targets

    def resolve_tensor(self, item):
        return self.targets[item.dest_index].narrow(0, item.dest_offsets[0], item.lengths[0])

    def commit_tensor(self, item, tensor):
        pass


def rank_parameters(args, rank: int) -> list[tuple[str, tuple[int, ...]]]:
    """(global name, local shape) of model-parallel rank `rank`'s trainable parameters, in the
    named_parameters() order of its megatron-core GPTModel."""
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    impl = getattr(args, "transformer_impl", "transformer_engine")
    if getattr(args, "virtual_pipeline_model_parallel_size", None):
        raise CheckpointError("virtual pipeline stages (several grad buffers per rank) are not supported")
    if impl not in IMPLS:
        raise CheckpointError(f"--transformer-impl {impl}: parameter order unknown")
    glob, layer = expected_shapes(args)
    if tied(args) and pp > 1:  # the last stage keeps a copy of the embedding as its output layer
        glob = {**glob, "output_layer.weight": glob["embedding.word_embeddings.weight"]}
    stage = rank // tp
    start, count = pipeline_stages(args.num_layers, pp, getattr(args, "decoder_first_pipeline_num_layers", None),
                                   getattr(args, "decoder_last_pipeline_num_layers", None))[stage]
    names = gpt_parameter_order(set(glob), layer_param_order(args), range(start, start + count), stage == 0,
                                stage == pp - 1, impl)
    return [(n, _local(n, glob[n] if n in glob else layer[n.split(".", 3)[3]], tp)) for n in names]


def bucket_slices(params: list[tuple[str, int]], bucket_numels: list[int]) -> dict[str, tuple[int, int]]:
    """(bucket, start in it) of each (name, numel) of one grad buffer, given in named_parameters() order,
    found from the stored bucket lengths (which end at a bucket's last parameter)."""
    out, b, pos, count = {}, 0, 0, 0
    for name, numel in reversed(params):  # DDP fills its buffer in reverse (backward) order
        pos = -(-pos // PARAM_ALIGN) * PARAM_ALIGN
        if count and b < len(bucket_numels) and pos == bucket_numels[b]:  # closed before a shared embedding
            b, pos, count = b + 1, 0, 0
        if b == len(bucket_numels):
            raise CheckpointError(f"the parameters overflow the {b} stored buckets at {name}")
        out[name] = (b, pos)
        pos, count = pos + numel, count + 1
        if pos > bucket_numels[b]:
            raise CheckpointError(f"{name} ends at {pos}, past the {bucket_numels[b]} elements of bucket {b}")
        if pos == bucket_numels[b]:
            b, pos, count = b + 1, 0, 0
    if b != len(bucket_numels):
        raise CheckpointError(f"the parameters fill {pos} elements of bucket {b}, {bucket_numels[b]} are stored")
    return out


class DpReshardableState:
    """Where each parameter's optimizer state lies in the flat buckets, and reading it per unit."""

    def __init__(self, view):
        args, self.view, self.gated = view.args, view, gated(view.args)
        self.shared_output = tied(args) and args.pipeline_model_parallel_size > 1  # a copy, not carried
        self.local_shape: dict[str, tuple[int, ...]] = {}
        self.slices: dict[str, list[tuple[str, int]]] = {}  # name -> (bucket key, start) per TP rank
        self.bucket_numels: dict[str, int] = {}  # bucket key -> stored length
        for rank in range(args.tensor_model_parallel_size * args.pipeline_model_parallel_size):
            params = rank_parameters(args, rank)
            prefix = _rank_prefix(rank)
            buffers = _object(view, prefix + "per_bucket_numel_unpadded")
            if len(buffers) != 1 or len(buffers[0]) != 1:
                raise CheckpointError(f"model-parallel rank {rank}: {sum(len(b) for b in buffers)} grad buffers "
                                      "(one expected: a single dtype, no virtual pipeline)")
            (dtypes, numels), = buffers[0].items()
            buckets = [f"{prefix}gbuf_idx_0.dtype_{dtypes}.bucket_idx_{b}" for b in range(len(numels))]
            self.bucket_numels.update(zip(buckets, numels))
            try:
                where = bucket_slices([(n, math.prod(s)) for n, s in params], numels)
            except CheckpointError as e:
                raise CheckpointError(f"model-parallel rank {rank}: {e}") from None
            for name, shape in params:
                self.local_shape[name] = shape
                self.slices.setdefault(name, []).append((buckets[where[name][0]], where[name][1]))
        self.units: dict[int | None, list[str]] = {}  # the globals (None) and each layer's parameters
        for name in self.slices:
            if not (self.shared_output and name == "output_layer.weight"):
                self.units.setdefault(int(name.split(".")[2]) if name.startswith(LAYER_PREFIX) else None,
                                      []).append(name)
        first = next(iter(self.bucket_numels)) + "."
        self.states = tuple(sorted(k[len(first):] for k in view.metadata.state_dict_metadata if k.startswith(first)))
        self._check_stored()

    def _check_stored(self) -> None:
        md = self.view.metadata.state_dict_metadata
        for key, numel in self.bucket_numels.items():
            for state in self.states:
                entry = md.get(f"{key}.{state}")
                if entry is None or tuple(entry.size) != (numel,):
                    raise CheckpointError(f"{key}.{state}: " + ("missing" if entry is None else
                                          f"{entry.size[0]} elements, per_bucket_numel_unpadded says {numel}"))
                covered = sum(c.sizes[0] for c in entry.chunks)
                if covered != numel:
                    raise CheckpointError(f"{key}.{state}: chunks cover {covered} of {numel} elements")

    def read_into(self, unit: Unit, layer: int | None) -> None:
        """Add the optimizer states of the globals (layer None) or one layer to `unit`, TP-merged, under
        the unit's names; reads only those parameters' slices."""
        names = self.units.get(layer, [])
        strip = 0 if layer is None else len(f"{LAYER_PREFIX}{layer}.")
        md = self.view.metadata.state_dict_metadata
        targets, items, parts = {}, [], {}
        for state in self.states:
            boxes: dict[str, list[ChunkStorageMetadata]] = {}
            for name in names:
                ranks = self.slices[name] if tp_partition_dim(name) is not None else self.slices[name][:1]
                numel = math.prod(self.local_shape[name])
                for key, start in ranks:
                    fqn = f"{key}.{state}"
                    index = MetadataIndex(fqn, torch.Size([start]))
                    targets[index] = torch.empty(numel, dtype=md[fqn].properties.dtype)
                    boxes.setdefault(fqn, []).append(ChunkStorageMetadata(torch.Size([start]), torch.Size([numel])))
                    parts.setdefault((state, name), []).append(index)
            for fqn, chunks in boxes.items():
                items += create_read_items_for_chunk_list(fqn, md[fqn], chunks)
        try:
            self.view.reader.read_data(LoadPlan(items), _IntoBoxes(targets)).wait()
        except (OSError, RuntimeError, pickle.UnpicklingError, AssertionError) as e:
            raise CheckpointError(f"{self.view.path}: cannot read the dp_reshardable optimizer state "
                                  f"({type(e).__name__}: {e})") from None
        for (state, name), indices in parts.items():
            shards = [targets[i].view(self.local_shape[name]) for i in indices]
            unit.setdefault(state, {})[name[strip:]] = tp_unshard(shards, name, self.gated)
        self._check_main_params(unit)

    def _check_main_params(self, unit: Unit) -> None:
        """The fp32 main copy is the weights (rounded to their dtype): a misplaced slice shows here."""
        for name, main in unit.get("param", {}).items():
            weight = unit.get("model", {}).get(name)
            if weight is not None and weight.is_floating_point() and not torch.allclose(
                    main.float(), weight.float(), rtol=1e-2, atol=1e-6):
                raise CheckpointError(f"{self.view.path}: the dp_reshardable optimizer's fp32 copy of {name} "
                                      "differs from the weights (unexpected bucket layout); pass --no-optimizer")


def _local(name: str, shape, tp: int) -> tuple[int, ...]:
    """A parameter's shape on one TP rank."""
    local, dim = list(shape), tp_partition_dim(name)
    if dim is not None:
        local[dim] //= tp
    return tuple(local)
