"""Streaming read and write of torch_dist (dist_checkpointing / DCP) checkpoints.

torch_dist stores each tensor in global coordinates, layers of one kind stacked on a leading axis,
as chunks (one per layer per TP rank) in `__R_I.distcp` files indexed by `.metadata`. Reading one
layer asks torch's DCP reader for just that layer's box of each stacked tensor; writing emits each
unit's chunks as soon as it is produced and assembles `.metadata` at the end, as a collective
dist_checkpointing.save would, so neither side ever holds the model.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import pickle
from concurrent.futures import ThreadPoolExecutor, as_completed

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.filesystem import CURRENT_DCP_VERSION, _StorageInfo
from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, ChunkStorageMetadata, Metadata,
                                                   MetadataIndex, TensorProperties, TensorStorageMetadata)
from torch.distributed.checkpoint.planner import LoadPlan
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from megagrow.checkpoint.errors import CheckpointError
from megagrow.checkpoint.distcp_records import DistcpFile, chunk_box, stored_placement
from megagrow.checkpoint.placement import Placement, SourceFiles, copy_range
from megagrow.checkpoint.dp_reshardable import DpReshardableState, is_dp_reshardable, is_flat_key, param_groups
from megagrow.checkpoint.view import (EXTRA_STATE_MODULES, LAYER_PREFIX, RUN_STATE_KEY, CheckpointView,
                                      OptimizerCommon, Unit, run_state)
from megagrow.model.layout import pipeline_stages, tp_chunk_ranges
from megagrow.model.shape import expected_shapes, gated

OPT_PREFIX = "optimizer.state."
WRITE_THREADS = min(2, os.cpu_count() or 1)  # each unit's files are written concurrently
METADATA_JSON = {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                 "common_backend": "torch", "common_backend_version": 1}


class _Into:
    """The smallest LoadPlanner DCP's reader needs: copy each read box into its destination tensor."""

    def __init__(self, targets: dict[str, torch.Tensor]):
        self.targets = targets

    def resolve_tensor(self, item):
        t = self.targets[item.dest_index.fqn]
        for dim, (off, length) in enumerate(zip(item.dest_offsets, item.lengths)):
            t = t.narrow(dim, off, length)
        return t

    def commit_tensor(self, item, tensor):
        pass

    def load_bytes(self, item, value):
        self.targets[item.dest_index.fqn] = value.read()


def _split_key(key: str) -> tuple[str, str]:
    """`optimizer.state.exp_avg.output_layer.weight` -> ('exp_avg', 'output_layer.weight')."""
    if key.startswith(OPT_PREFIX):
        state, name = key[len(OPT_PREFIX):].split(".", 1)
        return state, name
    return "model", key


COMMON_PT = "common.pt"  # megatron-core <= 0.18 keeps the common state in this file
COMMON_STATE_KEY = "common_state/shard_0_1"  # 0.19+: a ShardedObject inside the DCP files


def read_sharded_object(reader: FileSystemReader, key: str):
    """A ShardedObject as dist_checkpointing stores it (`torch.save([data])` bytes under `key`)."""
    out = {key: None}
    reader.read_data(LoadPlan([_bytes_read_item(MetadataIndex(key))]), _Into(out)).wait()
    return _unpickle(io.BytesIO(out[key]))[0]


def _unpickle(source):
    """torch.load of what torch.save wrote (a zip archive); anything else is refused before it is unpickled:
    arbitrary bytes handed to the unpickler can ask for any amount of memory and print from inside CPython."""
    if isinstance(source, io.BytesIO):
        head = source.getvalue()[:4]
    else:
        with open(source, "rb") as f:
            head = f.read(4)
    if head != b"PK\x03\x04":
        raise ValueError("not a torch.save archive")
    return torch.load(source, map_location="cpu", weights_only=False)


def read_common_state(iter_dir: str, view=None) -> dict:
    """The non-tensor state (args, iteration, optimizer groups, ...) in either layout."""
    path = os.path.join(iter_dir, COMMON_PT)
    if os.path.isfile(path):
        return _unpickle(path)
    reader = view.reader if view is not None else FileSystemReader(iter_dir)
    metadata = view.metadata if view is not None else reader.read_metadata()
    if COMMON_STATE_KEY not in metadata.state_dict_metadata:
        raise FileNotFoundError(2, "no common state", path)
    if view is None:
        reader.set_up_storage_reader(metadata, is_coordinator=True)
    return read_sharded_object(reader, COMMON_STATE_KEY)


def _bytes_read_item(index):
    from torch.distributed.checkpoint.planner import LoadItemType, ReadItem
    return ReadItem(type=LoadItemType.BYTE_IO, dest_index=index, dest_offsets=torch.Size(()),
                    storage_index=index, storage_offsets=torch.Size(()), lengths=torch.Size(()))


class TorchDistView(CheckpointView):
    format = "torch_dist"

    def __init__(self, iter_dir: str):
        self.path = iter_dir
        self.reader = FileSystemReader(iter_dir)
        self._files = SourceFiles()  # the .distcp files placements read record headers from (opened on use)
        try:
            self.metadata = self.reader.read_metadata()
            self.reader.set_up_storage_reader(self.metadata, is_coordinator=True)
            common = read_common_state(iter_dir, self)
        except FileNotFoundError as e:
            raise CheckpointError(f"{iter_dir}: missing {os.path.basename(e.filename)}") from None
        except CheckpointError:
            raise
        except Exception as e:  # truncated or not a checkpoint file
            raise CheckpointError(f"{iter_dir}: unreadable checkpoint metadata ({type(e).__name__}: {e})") from None
        args = common.get("args")
        if args is None:
            raise CheckpointError(f"{iter_dir}: the checkpoint's common state has no 'args'")
        self.content_metadata = common.get("content_metadata")
        opt = common.get("optimizer")
        self.dp_reshardable = is_dp_reshardable(opt)  # optimizer state in flat buckets: see dp_reshardable.py
        super().__init__(args=args, iteration=common.get("iteration", 0), optimizer=_optimizer_common(opt, self),
                         extra={**{k: common[k] for k in ("opt_param_scheduler", "num_floating_point_operations_so_far")
                                   if k in common}, RUN_STATE_KEY: run_state(common, args)})
        self.tensors = {k: v for k, v in self.metadata.state_dict_metadata.items()
                        if isinstance(v, TensorStorageMetadata) and not is_flat_key(k)}
        self._states = tuple(sorted({_split_key(k)[0] for k in self.tensors} - {"model"})) if self.optimizer else ()
        self._dp = None
        if self.dp_reshardable and self.optimizer:
            try:
                self._dp = DpReshardableState(self)
                self._states = self._dp.states
            except CheckpointError as e:
                self.unsupported_optimizer = f"its dp_reshardable optimizer state ({e})"

    @property
    def optimizer_states(self) -> tuple[str, ...]:
        return self._states  # whatever the optimizer saved, carried under its own names

    def _read(self, keys: list[str], layer: int | None) -> dict[str, torch.Tensor]:
        out, items = {}, []
        for key in keys:
            md = self.tensors[key]
            size = list(md.size)
            offsets = [0] * len(size)
            if layer is not None:
                offsets[0], size[0] = layer, 1
            out[key] = torch.empty(size, dtype=md.properties.dtype)
            items += create_read_items_for_chunk_list(
                key, md, [ChunkStorageMetadata(torch.Size(offsets), torch.Size(size))])
        try:
            self.reader.read_data(LoadPlan(items), _Into(out)).wait()
        except (OSError, RuntimeError, pickle.UnpicklingError, AssertionError) as e:
            raise CheckpointError(f"{self.path}: cannot read {keys[0]}... ({type(e).__name__}: {e})") from None
        return {k: (v[0] if layer is not None else v) for k, v in out.items()}

    def read_object(self, key: str):
        return read_sharded_object(self.reader, key)

    def placements(self, index: int | None) -> dict[str, Placement]:
        """Model tensors whose chunks are plain torch.save archives, located in their .distcp files."""
        out = {}
        for key, md in self.tensors.items():
            state, name = _split_key(key)
            if state != "model" or name.startswith(LAYER_PREFIX) != (index is not None):
                continue
            shape, dtype = tuple(md.size[1:] if index is not None else md.size), md.properties.dtype
            itemsize = dtype.itemsize
            boxes = []
            for chunk in md.chunks:
                offsets, sizes = tuple(chunk.offsets), tuple(chunk.sizes)
                if index is not None and not offsets[0] <= index < offsets[0] + sizes[0]:
                    continue
                info = self.metadata.storage_data.get(MetadataIndex(key, chunk.offsets))
                if info is None or info.transform_descriptors:
                    break
                path = os.path.join(self.path, info.relative_path)
                start = stored_placement(self._files, path, info.offset, info.length, dtype, math.prod(sizes))
                if start is None:
                    break
                if index is not None:  # the layer's slice of a chunk stacked over layers
                    start += (index - offsets[0]) * math.prod(sizes[1:]) * itemsize
                    offsets, sizes = offsets[1:], sizes[1:]
                box = chunk_box(offsets, sizes, shape, path, start, itemsize)
                if box is None:
                    break
                boxes.append(box)
            else:
                out[name[len(LAYER_PREFIX):] if index is not None else name] = Placement(shape, dtype, tuple(boxes))
        return out

    def close(self) -> None:
        self._files.close()

    def _unit(self, keys: list[str], layer: int | None, strip: str) -> Unit:
        unit: Unit = {"model": {}}
        for key, tensor in self._read(keys, layer).items():
            state, name = _split_key(key)
            if state != "model" and state not in self.optimizer_states:
                continue
            unit.setdefault(state, {})[name[len(strip):]] = tensor
        if self._dp is not None:
            self._dp.read_into(unit, layer)
        return unit

    def read_globals(self) -> Unit:
        keys = [k for k in self.tensors if not _split_key(k)[1].startswith(LAYER_PREFIX)]
        return self._unit(keys, None, "")

    def read_layer(self, index: int) -> Unit:
        if not 0 <= index < self.num_layers:
            raise IndexError(index)
        keys = [k for k in self.tensors if _split_key(k)[1].startswith(LAYER_PREFIX)]
        return self._unit(keys, index, LAYER_PREFIX)

    def problems(self) -> list[str]:
        """Completeness: every chunk's bytes are on disk, chunks cover each tensor, shapes match args."""
        found = []
        sizes = {}
        for index, info in self.metadata.storage_data.items():
            path = os.path.join(self.path, info.relative_path)
            if path not in sizes:
                sizes[path] = os.path.getsize(path) if os.path.exists(path) else None
            if sizes[path] is None:
                found.append(f"missing shard file {info.relative_path}")
                sizes[path] = -1
            elif sizes[path] >= 0 and info.offset + info.length > sizes[path]:
                found.append(f"truncated shard file {info.relative_path} ({sizes[path]} bytes, "
                             f"needs {info.offset + info.length})")
                sizes[path] = -1
        for key, md in self.tensors.items():
            covered = sum(torch.Size(c.sizes).numel() for c in md.chunks)
            if covered != md.size.numel():
                found.append(f"{key}: chunks cover {covered} of {md.size.numel()} elements")
        glob, layer = expected_shapes(self.args)
        for key, md in self.tensors.items():
            name = key.split(".", 3)[3] if key.startswith(OPT_PREFIX) else key
            if name.startswith(LAYER_PREFIX):
                rel = name[len(LAYER_PREFIX):]
                want = (self.num_layers,) + layer[rel] if rel in layer else None
            else:
                want = glob.get(name)
            if want is None:
                found.append(f"unknown key {key}")
            elif tuple(md.size) != want:
                found.append(f"{key}: shape {tuple(md.size)}, the args say {want}")
        return [f"{self.path}: {p}" for p in found]


def _optimizer_common(opt: dict | None, view: TorchDistView) -> OptimizerCommon | None:
    if not opt:
        return None
    if "param_state_sharding_type" in opt:  # distributed optimizer
        dp_sharded = is_dp_reshardable(opt)  # its groups are a ShardedObject; written back fully_reshardable
        groups = param_groups(view) if dp_sharded else opt["optimizer"]["param_groups"]
        step = groups[0].get("step", 0) if groups else 0
        return OptimizerCommon([_hyper(g) for g in groups], float(step), distributed=True,
                               torch_dist_common=None if dp_sharded else opt)
    inner = opt.get("optimizer", opt)  # the bf16/fp16 optimizer nests torch's state dict one level down
    step = inner.get("state", {}).get("common_step", 0)
    return OptimizerCommon([_hyper(g) for g in inner["param_groups"]], float(step), distributed=False,
                           torch_dist_common=opt)


def _hyper(group: dict) -> dict:
    return {k: v for k, v in group.items() if k not in ("params", "step")}


def optimizer_common_to_torch_dist(opt: OptimizerCommon) -> dict:
    if opt.torch_dist_common is not None:
        return opt.torch_dist_common
    if opt.distributed:
        return {"optimizer": {"param_groups": [{**g, "step": opt.step} for g in opt.param_groups]},
                "param_state_sharding_type": "fully_reshardable"}
    return {"state": {"common_step": torch.tensor(opt.step)}, "param_groups": [dict(g) for g in opt.param_groups]}


def write_torch_dist(view: CheckpointView, out_dir: str, args, tp: int, pp: int, with_optimizer: bool,
                     progress=None) -> None:
    """Write `view` as a torch_dist checkpoint directory for TP=tp, PP=pp (chunks as its ranks would hold).

    A unit whose tensors the view can place on disk (view.placements) is never read: its chunks' bytes are copied
    from where they lie (distcp_records, placement)."""
    os.makedirs(out_dir, exist_ok=True)
    states = ("model",) + (view.optimizer_states if with_optimizer else ())
    entries: dict[str, TensorStorageMetadata | BytesStorageMetadata] = {}
    storage: dict = {}
    stages = pipeline_stages(args.num_layers, pp, getattr(args, "decoder_first_pipeline_num_layers", None),
                             getattr(args, "decoder_last_pipeline_num_layers", None))
    stage_of = {i: s for s, (start, n) in enumerate(stages) for i in range(start, start + n)}
    glob_names, layer_names = (set(names) for names in expected_shapes(view.args))
    empty_extra_state = io.BytesIO()
    torch.save([None], empty_extra_state)
    file_seq = [0]

    def unit_of(layer: int | None) -> Unit:
        placed = view.placements(layer) if states == ("model",) else {}
        if set(placed) >= (glob_names if layer is None else layer_names):
            return {"model": placed}
        return view.read_globals() if layer is None else view.read_layer(layer)

    def write_file(name: str, items: list) -> dict:
        out = DistcpFile(out_dir, name, files)
        try:
            for index, data, shape in items:
                if shape is None:
                    out.raw(index, data)
                else:
                    out.tensor(index, data, shape)
        finally:
            written = out.close()
        return written

    def emit(unit: Unit, stage: int, layer: int | None) -> list:
        """A unit's files: one per TP rank holding that rank's chunks."""
        per_rank: dict[int, list] = {}
        for state in states:
            for name, tensor in unit.get(state, {}).items():
                key = (name if layer is None else LAYER_PREFIX + name)
                if state != "model":
                    key = f"{OPT_PREFIX}{state}.{key}"
                glob_shape = tuple(tensor.shape) if layer is None else (args.num_layers,) + tuple(tensor.shape)
                _add_tensor_entry(entries, key, tensor, glob_shape)
                for r, boxes in enumerate(tp_chunk_ranges(name, tensor.shape, tp, gated(args))):
                    if r > 0 and not boxes_differ(boxes, tensor.shape):
                        break  # replicated tensors are written once
                    for offsets, sizes in boxes:
                        chunk = _chunk(tensor, offsets, sizes)
                        if layer is not None:
                            offsets, sizes = (layer,) + tuple(offsets), (1,) + tuple(sizes)
                        entries[key].chunks.append(ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes)))
                        per_rank.setdefault(stage * tp + r, []).append(
                            (MetadataIndex(key, torch.Size(offsets)), chunk, tuple(sizes)))
        if layer is not None:  # the per-layer (empty) extra states megatron-core asks for on load
            for module in EXTRA_STATE_MODULES:
                key = f"{LAYER_PREFIX}{module}._extra_state/shard_{layer}_{args.num_layers}"
                entries[key] = BytesStorageMetadata()
                per_rank.setdefault(stage * tp, []).append(
                    (MetadataIndex(key), empty_extra_state.getvalue(), None))
        names = []
        for rank in sorted(per_rank):
            names.append((f"__{rank}_{file_seq[0]}.distcp", per_rank[rank]))
            file_seq[0] += 1
        return [writers.submit(write_file, name, items) for name, items in names]

    # Layer i+1 is read while layer i is written (two layers in memory); each unit's files are written
    # concurrently, their bytes copied in the kernel where they are placed.
    with SourceFiles() as files, ThreadPoolExecutor(WRITE_THREADS) as writers, ThreadPoolExecutor(1) as reader:
        # embedding rows are split by TP; the final norm and output layer live on the last stage
        for written in emit(unit_of(None), 0, None):
            storage.update(written.result())
        next_unit = reader.submit(unit_of, 0) if args.num_layers else None
        for i in range(args.num_layers):
            unit = next_unit.result()
            if i + 1 < args.num_layers:
                next_unit = reader.submit(unit_of, i + 1)
            for written in emit(unit, stage_of[i], i):
                storage.update(written.result())
            del unit
            if progress:
                progress(i + 1)
    write_metadata(out_dir, Metadata(state_dict_metadata=entries, storage_data=storage))
    _write_common(view, out_dir, args, with_optimizer)


def _chunk(tensor: torch.Tensor | Placement, offsets, sizes) -> torch.Tensor | Placement:
    if isinstance(tensor, Placement):
        return tensor.crop(offsets, sizes)
    for dim, (o, n) in enumerate(zip(offsets, sizes)):
        tensor = tensor.narrow(dim, o, n)
    return tensor


def write_metadata(out_dir: str, metadata: Metadata) -> None:
    """`.metadata` as DCP's writer finishes it (under a temporary name, then renamed)."""
    metadata.version = metadata.version or CURRENT_DCP_VERSION
    with open(os.path.join(out_dir, ".metadata.tmp"), "wb") as f:
        pickle.dump(metadata, f)
    os.replace(os.path.join(out_dir, ".metadata.tmp"), os.path.join(out_dir, ".metadata"))


def written_content_metadata(distributed_optimizer: bool, sharding: str = "fully_reshardable") -> dict:
    """Megatron-LM's content_metadata (how the sharded state dict was built; its loader rebuilds the
    same). The writers here produce per-parameter optimizer state: the fully_reshardable layout."""
    meta = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
    if distributed_optimizer:
        meta = {"distrib_optim_sharding_type": sharding, **meta}
        if sharding == "fully_reshardable":
            meta["distrib_optim_fully_reshardable_mem_efficient"] = False
    return meta


def _write_common(view: CheckpointView, out_dir: str, args, with_optimizer: bool) -> None:
    args = argparse.Namespace(**{**vars(args), "no_save_rng": True})  # Megatron-LM then skips RNG on load
    common = {"checkpoint_version": 3.0, "iteration": view.iteration, "args": args,
              "num_floating_point_operations_so_far": view.extra.get("num_floating_point_operations_so_far", 0),
              "content_metadata": written_content_metadata(with_optimizer and view.optimizer is not None
                                                           and view.optimizer.distributed),
              RUN_STATE_KEY: view.extra.get(RUN_STATE_KEY, {})}
    if with_optimizer and view.optimizer is not None:
        common["optimizer"] = optimizer_common_to_torch_dist(view.optimizer)
        if "opt_param_scheduler" in view.extra:
            common["opt_param_scheduler"] = view.extra["opt_param_scheduler"]
    torch.save(common, os.path.join(out_dir, "common.pt"))
    with open(os.path.join(out_dir, "metadata.json"), "w") as f:
        json.dump(METADATA_JSON, f)


VOCAB_TENSORS = ("embedding.word_embeddings.weight", "output_layer.weight")
# Objects a copy leaves behind: RNG streams and the rerun state belong to the source's ranks; the
# common state is written anew (common.pt, which every megatron-core release reads).
LAYOUT_BOUND_KEYS = ("rng_state", "rerun_state_machine", "common_state")


def copy_torch_dist(view: TorchDistView, out_dir: str, args, with_optimizer: bool, progress=None,
                    layer_map: list[int] | None = None) -> None:
    """torch_dist -> torch_dist at another TP/PP without deserialising tensors.

    Chunks are stored in global coordinates, so they are valid at any parallelism: their bytes are
    copied as they are (in-kernel, copy_file_range) and a new `.metadata` indexes them. Only `args`
    change, the layout-bound RNG states are dropped, and embedding/output rows are rewritten when
    the vocabulary padding differs at the target TP. `layer_map[i]` = the source layer of new layer
    i (depth growth by copying): each layer chunk is copied once per new position it fills.
    """
    from megagrow.model.layout import resize_vocab_rows
    os.makedirs(out_dir)
    md = view.metadata
    old_layers = view.num_layers
    layer_map = list(range(old_layers)) if layer_map is None else layer_map
    targets: dict[int, list[int]] = {}
    for new, old in enumerate(layer_map):
        targets.setdefault(old, []).append(new)
    keep, renamed = {}, {}  # new metadata entries; source key -> [(new key, old chunk offset -> new)]
    for key, entry in md.state_dict_metadata.items():
        if key.startswith(LAYOUT_BOUND_KEYS) or (not with_optimizer and key.startswith(OPT_PREFIX)):
            continue
        if not _split_key(key)[1].startswith(LAYER_PREFIX):
            keep[key] = entry
        elif isinstance(entry, TensorStorageMetadata):
            chunks = [ChunkStorageMetadata(torch.Size((new,) + tuple(c.offsets[1:])), c.sizes)
                      for c in entry.chunks for new in targets.get(c.offsets[0], [])]
            keep[key] = TensorStorageMetadata(entry.properties, torch.Size((len(layer_map),) + tuple(entry.size[1:])),
                                              chunks)
        else:  # per-layer extra state: `<module>._extra_state/shard_<layer>_<layers>`
            base, layer = key.rsplit("/shard_", 1)[0], int(key.rsplit("/shard_", 1)[1].split("_")[0])
            for new in targets.get(layer, []):
                keep[f"{base}/shard_{new}_{len(layer_map)}"] = entry
            renamed[key] = [f"{base}/shard_{new}_{len(layer_map)}" for new in targets.get(layer, [])]
    resized = [k for k, v in keep.items() if isinstance(v, TensorStorageMetadata)
               and _split_key(k)[1] in VOCAB_TENSORS and v.size[0] != args.padded_vocab_size]
    by_file: dict[str, list] = {}
    for index, info in md.storage_data.items():
        key = index.fqn
        if key in resized or (key not in keep and key not in renamed):
            continue
        if key in renamed:
            news = [MetadataIndex(k) for k in renamed[key]]
        elif _split_key(key)[1].startswith(LAYER_PREFIX):
            news = [MetadataIndex(key, torch.Size((new,) + tuple(index.offset[1:])))
                    for new in targets.get(index.offset[0], [])]
        else:
            news = [index]
        for new_index in news:
            by_file.setdefault(info.relative_path, []).append((new_index, info))
    def copy_file(name: str, items: list) -> dict:
        placed = {}
        items.sort(key=lambda x: x[1].offset)
        with open(os.path.join(view.path, name), "rb") as src, open(os.path.join(out_dir, name), "wb") as dst:
            pos = 0
            for index, info in items:
                copy_range(src.fileno(), dst.fileno(), info.offset, pos, info.length)
                placed[index] = _StorageInfo(name, pos, info.length, info.transform_descriptors)
                pos += info.length
        return placed

    storage = {}
    total = len(by_file)
    # Files are independent and the copies run in the kernel (no GIL): a few at once keep the disk busy.
    with ThreadPoolExecutor(max_workers=COPY_THREADS) as pool:
        copies = [pool.submit(copy_file, name, items) for name, items in sorted(by_file.items())]
        for done, copied in enumerate(as_completed(copies), 1):
            copied.result()
            if progress:
                progress(done * args.num_layers // total)
    for copied in copies:  # in file order, whatever order they finished in: the same .metadata every time
        storage.update(copied.result())
    if resized:  # re-padded vocabulary tensors, written whole into one file of their own
        with SourceFiles() as files:
            vocab = DistcpFile(out_dir, "__vocab.distcp", files)
            for key in resized:
                t = resize_vocab_rows(view._read([key], None)[key], args.padded_vocab_size)
                keep[key] = TensorStorageMetadata(TensorProperties(dtype=t.dtype), t.shape,
                                                  [ChunkStorageMetadata(torch.Size([0] * t.dim()), t.shape)])
                vocab.tensor(MetadataIndex(key, torch.Size([0] * t.dim())), t, tuple(t.shape))
            storage.update(vocab.close())
    metadata = Metadata(state_dict_metadata=keep, storage_data=storage)
    metadata.version = md.version
    write_metadata(out_dir, metadata)
    _write_common(view, out_dir, args, with_optimizer)


COPY_THREADS = 4


def boxes_differ(boxes, shape) -> bool:
    """True when a rank's boxes are a proper part of the tensor (it is split, not replicated)."""
    return any(tuple(s) != tuple(shape) for _, s in boxes)


def _add_tensor_entry(entries: dict, key: str, tensor: torch.Tensor, glob_shape: tuple) -> None:
    if key not in entries:
        entries[key] = TensorStorageMetadata(properties=TensorProperties(dtype=tensor.dtype),
                                             size=torch.Size(glob_shape), chunks=[])
    elif tuple(entries[key].size) != glob_shape:
        raise CheckpointError(f"{key}: inconsistent shapes {tuple(entries[key].size)} and {glob_shape}")


def is_torch_dist(it_dir: str) -> bool:
    return os.path.isfile(os.path.join(it_dir, "metadata.json")) or os.path.isfile(os.path.join(it_dir, ".metadata"))
