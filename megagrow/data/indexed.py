"""Megatron's indexed dataset files checked without megatron-core, so that a bad --data-path or --split
is one line on every rank before any process group exists.

The `.idx` format (megatron/core/datasets/indexed_dataset.py): `MMIDIDX\\x00\\x00`, version (<Q, 1), the
token dtype code (<B), the sequence count (<Q) and document count (<Q), then int32 sequence lengths,
int64 byte offsets of each sequence in the `.bin`, and int64 document boundaries.
"""

from __future__ import annotations

import os
import re
import struct

import numpy as np

from megagrow.errors import MegagrowError

INDEX_HEADER = b"MMIDIDX\x00\x00"
HEADER_BYTES = 34  # magic 9 + version 8 + dtype code 1 + sequence count 8 + document count 8
DTYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 8, 7: 4, 8: 2}  # megatron-core's DType codes -> bytes
SPLITS = ("train", "valid", "test")


def blend(paths: list[str]) -> tuple[list[float] | None, list[str]] | None:
    """Megatron-LM's --data-path: `prefix ...` -> (None, prefixes); `weight prefix weight prefix ...` ->
    (weights, prefixes); a blend that is not well formed -> None."""
    def weight(text: str) -> float | None:
        try:
            return float(text)
        except ValueError:
            return None
    weights = [weight(w) for w in paths[::2]]
    if len(paths) == 1 or all(w is None for w in weights):
        return None, list(paths)
    if len(paths) % 2 or None in weights:
        return None
    return weights, list(paths[1::2])


class DataError(MegagrowError):
    """Data that cannot be read as asked; one line naming the file."""


def sequence_lengths(prefix: str) -> np.ndarray:
    """The `.idx`'s sequence lengths, once its header is sound and the `.bin` holds what it describes."""
    idx, bin_path = prefix + ".idx", prefix + ".bin"
    size = os.path.getsize(idx)
    with open(idx, "rb") as f:
        head = f.read(HEADER_BYTES)
    if len(head) < HEADER_BYTES or head[:9] != INDEX_HEADER:
        raise DataError(f"{idx}: not a Megatron indexed dataset index ({size} bytes, no MMIDIDX header)")
    version, code, sequences, documents = struct.unpack("<QBQQ", head[9:])
    if version != 1 or code not in DTYPE_SIZES:
        raise DataError(f"{idx}: unsupported index (version {version}, token dtype code {code})")
    need = HEADER_BYTES + 12 * sequences + 8 * documents
    if size < need:
        raise DataError(f"{idx}: truncated ({size} bytes, its header describes {need})")
    lengths = np.memmap(idx, np.int32, "r", HEADER_BYTES, (sequences,)) if sequences else np.zeros(0, np.int32)
    pointers = np.memmap(idx, np.int64, "r", HEADER_BYTES + 4 * sequences, (sequences,)) if sequences else [0]
    expected = int(pointers[-1]) + (int(lengths[-1]) * DTYPE_SIZES[code] if sequences else 0)
    actual = os.path.getsize(bin_path)
    if actual != expected:
        raise DataError(f"{bin_path}: {actual} bytes, but {os.path.basename(idx)} describes {expected} "
                        f"({sequences} sequences): the pair does not match (rebuild it with tools/preprocess_data.py)")
    return lengths


def split_matrix(split: str) -> list[tuple[float, float] | None]:
    """Megatron-core's split bookends of `--split` ("969,30,1" -> [(0, .969), (.969, .999), (.999, 1)]),
    None for a split of weight 0."""
    weights = [float(w) for w in re.findall(r"[.0-9]+", split)]
    if len(weights) > len(SPLITS) or not sum(weights) > 0:
        raise DataError(f"--split {split}: expected up to 3 weights (train, valid, test) with a positive sum")
    weights = (np.array(weights + [0.0] * (len(SPLITS) - len(weights))) / sum(weights)).tolist()
    edges = [0.0]
    for w in weights:  # as megatron-core adds them up, so rounding at the bookends is the same
        edges.append(edges[-1] + w)
    return [(a, b) if b > a else None for a, b in zip(edges[:-1], edges[1:])]


def check_split(prefix: str, split: str) -> None:
    """Each split of `prefix` that has a weight gets tokens (the document ranges megatron-core takes).

    megatron-core loops forever computing epochs for a split whose documents hold no tokens
    (e.g. "969,30,1" on a corpus of a few hundred documents gives the test split none).
    """
    lengths = sequence_lengths(prefix)
    for name, bounds in zip(SPLITS, split_matrix(split)):
        if bounds is None:
            continue
        beg, end = (int(round(b * len(lengths))) for b in bounds)
        if int(np.sum(lengths[beg:end], dtype=np.int64)) == 0:
            raise DataError(f"--split {split} leaves the {name} split of {prefix} ({len(lengths)} "
                            f"documents) without tokens: use more data or another split")
