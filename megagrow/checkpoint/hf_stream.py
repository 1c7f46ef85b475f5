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

import torch

from megagrow.checkpoint.errors import CheckpointError
from megagrow.checkpoint.view import CheckpointView, Unit
from megagrow.model import hf_layout
from megagrow.model.shape import expected_shapes

CONFIG = "config.json"
SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")
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
            return {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}

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
    """Writes planned safetensors shards in order: a shard's header first (its shapes are known), then its
    tensors as they come."""

    def __init__(self, out_dir: str, shards, dtype: torch.dtype):
        self.out_dir, self.shards, self.dtype, self.size = out_dir, shards, dtype, torch.empty((), dtype=dtype).element_size()
        self.names = [self.file_name(i) for i in range(len(shards))]
        self.shard, self.position, self.f = -1, 0, None

    def file_name(self, i: int) -> str:
        return SAFETENSORS if len(self.shards) == 1 else f"model-{i + 1:05d}-of-{len(self.shards):05d}.safetensors"

    def _next(self) -> None:
        if self.f:
            self.f.close()
        self.shard, self.position = self.shard + 1, 0
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape in self.shards[self.shard]:
            n = math.prod(shape) * self.size
            header[name] = {"dtype": _DTYPES[self.dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # safetensors aligns the data start to 8 bytes
        self.f = open(os.path.join(self.out_dir, self.names[self.shard]), "wb")
        self.f.write(struct.pack("<Q", len(text)) + text)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self.f is None or self.position == len(self.shards[self.shard]):
            self._next()
        expected_name, shape = self.shards[self.shard][self.position]
        assert name == expected_name and tuple(tensor.shape) == shape, (name, expected_name, tensor.shape, shape)
        self.f.write(tensor.to(self.dtype).contiguous().view(torch.uint8).numpy())  # no copy: the buffer
        self.position += 1

    def close(self) -> dict[str, str]:
        if self.f:
            self.f.close()
        return {name: self.names[i] for i, shard in enumerate(self.shards) for name, _ in shard}


def write_hf(view: CheckpointView, out_dir: str, family: str | None, max_shard_bytes: int, progress=None) -> dict:
    """Write `view` as a Hugging Face model directory; returns its config."""
    args = view.args
    config = hf_layout.hf_config(args, family)
    vocab = config["vocab_size"]
    glob = view.read_globals()["model"]
    dtype = glob["embedding.word_embeddings.weight"].dtype
    config["torch_dtype"] = {torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(dtype, "float32")
    entries = [(n, (vocab,) + s[1:] if n in ("model.embed_tokens.weight", "lm_head.weight") else s, i)
               for n, s, i in hf_tensor_shapes(args)]
    writer = _ShardWriter(out_dir, _plan_shards(entries, dtype, max_shard_bytes), dtype)
    for name, tensor in glob.items():
        tensor = tensor[:vocab] if name in ("embedding.word_embeddings.weight", "output_layer.weight") else tensor
        writer.write(hf_layout.GLOBALS[name], hf_layout.norm_to_hf(name, tensor, args))
    del glob
    _, layer_names = expected_shapes(args)
    for i in range(args.num_layers):
        unit = view.read_layer(i)["model"]
        for name in layer_names:
            for hf_name, part in zip(hf_layout.hf_names(name, i), hf_layout.to_hf(name, unit[name], args)):
                writer.write(hf_name, hf_layout.norm_to_hf(name, part, args))
        if progress:
            progress(i + 1)
    weight_map = writer.close()
    total = sum(math.prod(s) for _, s, _ in entries) * torch.empty((), dtype=dtype).element_size()
    if len(writer.shards) > 1:
        with open(os.path.join(out_dir, SAFETENSORS_INDEX), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
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
