"""Hugging Face model directories: read as a checkpoint view (import), written from any view (export).

A directory with `config.json` and its weights (`model.safetensors`, sharded `model-*.safetensors` with their
index, or `pytorch_model*.bin`) opens as an `HFView`: Megatron `args` derived from the config, tensors read lazily
(safetensors' memory-mapped files; .bin files mapped by torch.load) and fused one layer at a time
(model/hf_layout.py). `export_hf` streams a view the other way: shards planned from the tensor shapes, each
shard's header written first, then one layer at a time, so memory holds about one layer.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

from megagrow.checkpoint.errors import CheckpointError
from megagrow.checkpoint.placement import Placement, SourceFiles, concat
from megagrow.checkpoint.view import CheckpointView, Unit
from megagrow.model import hf_layout
from megagrow.model.shape import expected_shapes, zero_centered_gamma

CONFIG = "config.json"
SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")
EXPORT_THREADS = 2
_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def is_hf(path: str) -> bool:
    """A Hugging Face model directory: config.json beside weights (or an index of them)."""
    return os.path.isfile(os.path.join(path, CONFIG)) and any(
        os.path.isfile(os.path.join(path, n)) for n in (SAFETENSORS, SAFETENSORS_INDEX, BIN, BIN_INDEX))


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not readable JSON ({e})") from None


def _weight_files(path: str) -> tuple[dict[str, str], list[str]]:
    """({tensor name: file}, files) from the index, or the one file there is."""
    for index in (SAFETENSORS_INDEX, BIN_INDEX):
        if os.path.isfile(os.path.join(path, index)):
            weight_map = _read_json(os.path.join(path, index)).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{path}/{index}: no weight_map")
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not os.path.isfile(os.path.join(path, f))]
            if missing:
                raise CheckpointError(f"{path}/{index} names {missing[0]}, which does not exist")
            return weight_map, files
    single = SAFETENSORS if os.path.isfile(os.path.join(path, SAFETENSORS)) else BIN
    return {}, [single]


class HFView(CheckpointView):
    format = "hf"
    dp_reshardable = False
    unsupported_optimizer = None

    def __init__(self, path: str):
        self.path = path
        config = _read_json(os.path.join(path, CONFIG))
        try:
            args = hf_layout.megatron_args(config, path if _has_tokenizer(path) else None)
        except KeyError as e:
            raise CheckpointError(f"{path}/{CONFIG}: no {e.args[0]}") from None
        except hf_layout.HFConfigError as e:
            raise CheckpointError(f"{path}/{e}") from None
        self.config = config
        weight_map, files = _weight_files(path)
        # Headers are read (and checked) up front; each tensor is read with its file opened for it only, so the
        # mapped pages of what was read are released at once rather than held until the end.
        self._stored: dict[str, Placement] = {}  # safetensors tensors, where they lie
        self._shapes = {f: self._header(f) for f in files}
        self._where = weight_map or {name: files[0] for name in self._shapes[files[0]]}
        super().__init__(args=args, iteration=0, optimizer=None, extra={})

    def _load(self, name: str):
        """A file's tensors, lazily: safetensors' memory-mapped handle, or torch.load's mapped dict."""
        full = os.path.join(self.path, name)
        try:
            if name.endswith(".safetensors"):
                from safetensors import safe_open
                return safe_open(full, framework="pt")
            return torch.load(full, map_location="cpu", mmap=True, weights_only=True)
        except Exception as e:  # safetensors and torch.load report damage in their own exception types
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"{full}: not a readable {name.rsplit('.', 1)[-1]} file ({first})") from None

    def _header(self, name: str) -> dict[str, tuple[int, ...]]:
        handle = self._load(name)
        if isinstance(handle, dict):
            return {k: tuple(v.shape) for k, v in handle.items() if isinstance(v, torch.Tensor)}
        with handle:
            shapes = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
        self._stored.update(_safetensors_offsets(os.path.join(self.path, name)))
        return shapes

    def _read(self, names: list[str]) -> dict[str, torch.Tensor]:
        missing = [n for n in names if n not in self._where]
        if missing:
            raise CheckpointError(f"{self.path}: the model files hold no {missing[0]}")
        out = {}
        for file in sorted({self._where[n] for n in names}):
            wanted = [n for n in names if self._where[n] == file]
            if not file.endswith(".safetensors"):  # a .bin: unpickled once, its storages mapped
                state = self._load(file)
                out.update({n: state[n].clone() for n in wanted})
                continue
            for name in wanted:  # one tensor's pages mapped at a time (a vocabulary matrix is the largest)
                with self._load(file) as handle:
                    out[name] = handle.get_tensor(name)
        return out

    def read_globals(self) -> Unit:
        glob, _ = expected_shapes(self.args)
        tensors = self._read([hf_layout.GLOBALS[n] for n in glob])
        return {"model": {n: tensors[hf_layout.GLOBALS[n]] for n in glob}}

    def read_layer(self, index: int) -> Unit:
        _, layer = expected_shapes(self.args)
        tensors = self._read([h for n in layer for h in hf_layout.hf_names(n, index)])
        return {"model": {n: hf_layout.to_megatron(n, [tensors[h] for h in hf_layout.hf_names(n, index)], self.args)
                          for n in layer}}

    def placements(self, index: int | None) -> dict[str, Placement]:
        """The Megatron tensors, fused by hf_layout.to_megatron applied to row numbers, over where their Hugging
        Face parts lie in the safetensors files."""
        glob, layer = expected_shapes(self.args)
        out = {}
        for name in (glob if index is None else layer):
            parts = [self._stored.get(h) for h in hf_layout.hf_names(name, index)]
            if None in parts or any(p.dtype != parts[0].dtype for p in parts):
                continue
            starts = [sum(p.shape[0] for p in parts[:i]) for i in range(len(parts))]
            rows = [torch.arange(start, start + p.shape[0]) for start, p in zip(starts, parts)]
            out[name] = concat(parts).take_rows(
                hf_layout.to_megatron(name, rows, self.args).tolist() if index is not None else rows[0].tolist())
        return out

    def problems(self) -> list[str]:
        """Tensors the config implies that are missing or of another shape (read from headers only)."""
        wanted = {name: shape for name, shape, _ in hf_tensor_shapes(self.args)}
        problems = []
        for name, shape in wanted.items():
            stored = self._shapes[self._where[name]].get(name) if name in self._where else None
            if stored is None:
                problems.append(f"{self.path}: the model files hold no {name}")
            elif stored != shape:
                problems.append(f"{self.path}: {name} has shape {list(stored)}, config.json implies {list(shape)}")
        return problems



_STORED_DTYPES = {name: dtype for dtype, name in _DTYPES.items()}


def _safetensors_offsets(path: str) -> dict[str, Placement]:
    """Where each tensor of a safetensors file lies (its header: a length, then JSON with offsets from the data
    start)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return {name: Placement.stored(path, 8 + n + entry["data_offsets"][0], entry["shape"],
                                   _STORED_DTYPES[entry["dtype"]])
            for name, entry in header.items() if name != "__metadata__" and entry.get("dtype") in _STORED_DTYPES
            and entry.get("shape")}


def _has_tokenizer(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, n)) for n in ("tokenizer.json", "tokenizer.model"))


def hf_tensor_shapes(args) -> list[tuple[str, tuple, int | None]]:
    """(name, shape, layer or None) of every Hugging Face tensor of a model with these args, in the order the
    export writes them: the globals (read once, first), then each layer."""
    glob, layer = expected_shapes(args)
    out = [(hf_layout.GLOBALS[n], s, None) for n, s in glob.items()]
    for i in range(args.num_layers):
        for n, shape in layer.items():
            parts = hf_layout.to_hf(n, torch.empty(shape, device="meta"), args)
            out += [(h, tuple(p.shape), i) for h, p in zip(hf_layout.hf_names(n, i), parts)]
    return out


def _plan_shards(entries, dtype: torch.dtype, max_bytes: int) -> list[list[tuple[str, tuple]]]:
    size = torch.empty((), dtype=dtype).element_size()
    shards, current, used = [], [], 0
    for name, shape, _ in entries:
        n = math.prod(shape) * size
        if current and used + n > max_bytes:
            shards.append(current)
            current, used = [], 0
        current.append((name, shape))
        used += n
    return shards + [current]


class _ShardWriter:
    """Planned safetensors shards, each header written first (the shapes are known), then each tensor at its place
    as it comes, from any thread (placed ones copied from where they lie)."""

    def __init__(self, out_dir: str, shards, dtype: torch.dtype, files: SourceFiles):
        self.dtype, self.files, self.size = dtype, files, torch.empty((), dtype=dtype).element_size()
        self.names = [SAFETENSORS if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                      for i in range(len(shards))]
        self.fds, self.where = [], {}  # {name: (fd, offset, shape)}
        for file_name, shard in zip(self.names, shards):
            header, offset = {"__metadata__": {"format": "pt"}}, 0
            for name, shape in shard:
                n = math.prod(shape) * self.size
                header[name] = {"dtype": _DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
                offset += n
            text = json.dumps(header, separators=(",", ":")).encode()
            text += b" " * (-len(text) % 8)  # safetensors aligns the data start to 8 bytes
            head = struct.pack("<Q", len(text)) + text
            self.fds.append(os.open(os.path.join(out_dir, file_name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644))
            files.write_rows(self.fds[-1], [memoryview(head)], 0)
            self.where.update({name: (self.fds[-1], len(head) + header[name]["data_offsets"][0], tuple(shape))
                               for name, shape in shard})
        self.weight_map = {name: file_name for file_name, shard in zip(self.names, shards) for name, _ in shard}

    def write(self, name: str, data: torch.Tensor | Placement) -> None:
        fd, offset, shape = self.where[name]
        assert tuple(data.shape) == shape, (name, data.shape, shape)
        if isinstance(data, Placement):
            data.copy_to(fd, offset, self.files)
        else:
            self.files.write(fd, data.to(self.dtype), offset)

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []


def _wait(jobs: list) -> None:
    for job in jobs:
        job.result()


def _model_unit(view: CheckpointView, index: int | None) -> dict:
    """A unit's model tensors: placed where the view can say where all of them lie in one dtype (and Hugging Face
    stores them unchanged), else read."""
    names = expected_shapes(view.args)[0 if index is None else 1]
    placed = view.placements(index)
    if set(placed) >= set(names) and len({p.dtype for p in placed.values()}) == 1 and \
            not zero_centered_gamma(view.args):
        return placed
    return (view.read_globals() if index is None else view.read_layer(index))["model"]


def _to_hf(name: str, data: torch.Tensor | Placement, args) -> list:
    if isinstance(data, Placement):  # the layout applied to row numbers
        return [data.take_rows(rows.tolist()) for rows in hf_layout.to_hf(name, torch.arange(data.shape[0]), args)]
    return hf_layout.to_hf(name, data, args)


def write_hf(view: CheckpointView, out_dir: str, family: str | None, max_shard_bytes: int, progress=None) -> dict:
    """Write `view` as a Hugging Face model directory; returns its config."""
    args = view.args
    config = hf_layout.hf_config(args, family)
    vocab = config["vocab_size"]
    glob = _model_unit(view, None)
    dtype = glob["embedding.word_embeddings.weight"].dtype
    config["torch_dtype"] = {torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(dtype, "float32")
    entries = [(n, (vocab,) + s[1:] if n in ("model.embed_tokens.weight", "lm_head.weight") else s, i)
               for n, s, i in hf_tensor_shapes(args)]
    shards = _plan_shards(entries, dtype, max_shard_bytes)
    shard_of = {name: i for i, shard in enumerate(shards) for name, _ in shard}
    _, layer_names = expected_shapes(args)
    reading, done = threading.Lock(), [0]

    def write_unit(writer: _ShardWriter, index: int | None) -> None:
        with reading:  # a view is read by one thread at a time
            unit = glob if index is None else _model_unit(view, index)
        for name, tensor in unit.items():
            if index is None and name in ("embedding.word_embeddings.weight", "output_layer.weight"):
                tensor = tensor.take_rows(range(vocab)) if isinstance(tensor, Placement) else tensor[:vocab]
            for hf_name, part in zip(hf_layout.hf_names(name, index), _to_hf(name, tensor, args)):
                writer.write(hf_name, hf_layout.norm_to_hf(name, part, args))
        if index is not None and progress:
            with reading:
                done[0] += 1
                progress(done[0])

    # Units go to the threads by the shard file they fill (two threads writing one file only contend for it).
    groups: dict[int, list] = {}
    for index in [None] + list(range(args.num_layers)):
        first = hf_layout.GLOBALS["embedding.word_embeddings.weight"] if index is None else \
            hf_layout.hf_names(next(iter(layer_names)), index)[0]
        groups.setdefault(shard_of[first], []).append(index)
    with SourceFiles() as files, ThreadPoolExecutor(EXPORT_THREADS) as pool:
        writer = _ShardWriter(out_dir, shards, dtype, files)
        try:
            _wait([pool.submit(lambda units: [write_unit(writer, i) for i in units], units)
                   for units in groups.values()])
        finally:
            writer.close()
    total = sum(math.prod(s) for _, s, _ in entries) * torch.empty((), dtype=dtype).element_size()
    if len(shards) > 1:
        with open(os.path.join(out_dir, SAFETENSORS_INDEX), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": writer.weight_map}, f, indent=2)
    with open(os.path.join(out_dir, CONFIG), "w") as f:
        json.dump(config, f, indent=2)
    return config


def copy_tokenizer(args, out_dir: str) -> str | None:
    """Copy the run's Hugging Face tokenizer files (--tokenizer-model of a HuggingFaceTokenizer run); returns the
    directory copied from, or None when the run used another tokenizer."""
    source = getattr(args, "tokenizer_model", None)
    if getattr(args, "tokenizer_type", None) != "HuggingFaceTokenizer" or not source or not os.path.isdir(source):
        return None
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(source, name)):
            shutil.copy2(os.path.join(source, name), os.path.join(out_dir, name))
    return source


def generation_config(out_dir: str) -> dict:
    """generation_config.json with the tokenizer's BOS/EOS ids when a tokenizer config names them."""
    config = {"_from_model_config": True}
    tok = os.path.join(out_dir, "tokenizer.json")
    if os.path.isfile(tok):
        from tokenizers import Tokenizer
        tokenizer = Tokenizer.from_file(tok)
        special = _read_json(os.path.join(out_dir, "tokenizer_config.json")) \
            if os.path.isfile(os.path.join(out_dir, "tokenizer_config.json")) else {}
        for key in ("bos_token", "eos_token"):
            token = special.get(key)
            token = token.get("content") if isinstance(token, dict) else token
            if token is not None and tokenizer.token_to_id(token) is not None:
                config[f"{key}_id"] = tokenizer.token_to_id(token)
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return config
