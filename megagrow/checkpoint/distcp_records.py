"""The items of torch_dist's `.distcp` files as torch's DCP FileSystemWriter lays them out (each tensor a torch.save
archive, each byte item its bytes), written without a serialisation pass over the data and read back as placements.

Once torch.save computes no CRC32 (torch.load does not check it: torch.serialization.set_crc32_options), the
archive of a tensor is the same prefix and suffix around its data for every tensor of one shape and dtype. So each
shape's prefix and suffix are taken once from torch.save itself, and the data between them is copied from memory
or, in the kernel, from where a placement says it lies.
"""

from __future__ import annotations

import collections
import functools
import io
import math
import os
import pickle
import struct
import threading
import zipfile

import numpy
import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo

from megagrow.checkpoint.placement import Box, Placement, SourceFiles


class _Recorder:
    """A file for torch.save that keeps every write but the tensor's data, whose place it remembers."""

    def __init__(self, tensor: torch.Tensor):
        self.address, self.nbytes = tensor.data_ptr(), tensor.numel() * tensor.element_size()
        self.prefix, self.suffix, self.seen = bytearray(), bytearray(), False

    def write(self, data) -> int:
        view = memoryview(data)
        if view.nbytes == self.nbytes and numpy.frombuffer(view, numpy.uint8).ctypes.data == self.address:
            self.seen = True
        else:
            (self.suffix if self.seen else self.prefix).extend(view)
        return view.nbytes

    def flush(self) -> None:
        pass


_CRC_OPTION = threading.Lock()


@functools.lru_cache(maxsize=256)
def archive_template(shape: tuple[int, ...], dtype: torch.dtype) -> tuple[bytes, bytes]:
    """(prefix, suffix) of torch.save's archive of a contiguous tensor of this shape and dtype."""
    tensor = torch.empty(shape, dtype=dtype)
    recorder = _Recorder(tensor)
    with _CRC_OPTION:  # a process-wide setting: one template at a time
        crc = torch.serialization.get_crc32_options()
        torch.serialization.set_crc32_options(False)
        try:
            torch.save(tensor, recorder)
        finally:
            torch.serialization.set_crc32_options(crc)
    if not recorder.seen:
        raise RuntimeError(f"torch.save wrote a {tuple(shape)} tensor's data in pieces: cannot template it")
    return bytes(recorder.prefix), bytes(recorder.suffix)


class DistcpFile:
    """One `.distcp` file being written: items appended, their _StorageInfo kept for `.metadata`."""

    def __init__(self, out_dir: str, name: str, files: SourceFiles):
        self.name, self.files, self.pos, self.storage = name, files, 0, {}
        self.fd = os.open(os.path.join(out_dir, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)

    def _put(self, data: bytes) -> None:
        self.files.write_rows(self.fd, [memoryview(data)], self.pos)
        self.pos += len(data)

    def tensor(self, index, data: torch.Tensor | Placement, shape: tuple[int, ...]) -> None:
        """Append a tensor stored as `shape` (its chunk's, a layer's with the leading 1)."""
        start = self.pos
        prefix, suffix = archive_template(tuple(shape), data.dtype)
        self._put(prefix)
        if isinstance(data, Placement):
            data.copy_to(self.fd, self.pos, self.files)
            self.pos += data.nbytes
        else:
            self.files.write(self.fd, data, self.pos)
            self.pos += data.numel() * data.element_size()
        self._put(suffix)
        self.storage[index] = _StorageInfo(self.name, start, self.pos - start)

    def raw(self, index, data: bytes) -> None:
        start = self.pos
        self._put(data)
        self.storage[index] = _StorageInfo(self.name, start, self.pos - start)

    def close(self) -> dict:
        os.close(self.fd)
        return self.storage


class _Header(pickle.Unpickler):
    """Unpickles a tensor archive's data.pkl into where its one tensor lies in its storage (nothing executed)."""

    def find_class(self, module: str, name: str):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return lambda storage, offset, size, stride, *rest: (storage, offset, tuple(size), tuple(stride))
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch" and name.endswith("Storage"):
            return name
        raise pickle.UnpicklingError(f"{module}.{name}")

    def persistent_load(self, pid):
        return pid[2], pid[4]  # ('storage', type, key, location, elements)


class _Slice(io.RawIOBase):
    """The bytes [start, start + length) of an open file, as a seekable file (one archive inside a .distcp)."""

    def __init__(self, fd: int, start: int, length: int):
        self.fd, self.start, self.length, self.pos = fd, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = max(0, {0: pos, 1: self.pos + pos, 2: self.length + pos}[whence])
        return self.pos

    def readinto(self, buffer) -> int:
        view = memoryview(buffer)[:max(0, self.length - self.pos)]
        n = os.preadv(self.fd, [view], self.start + self.pos) if len(view) else 0
        self.pos += n
        return n


def _stored_records(fd: int, start: int, length: int) -> dict[str, tuple[int, int]]:
    """{record name without the archive's folder: (data offset in the archive, size)} of a torch.save archive's
    uncompressed records (read from its central directory: torch writes sizes after the data)."""
    archive = _Slice(fd, start, length)
    out = {}
    with zipfile.ZipFile(archive) as z:
        for info in z.infolist():
            if info.compress_type != zipfile.ZIP_STORED:
                continue
            head = os.pread(fd, 30, start + info.header_offset)
            if len(head) < 30 or head[:4] != b"PK\x03\x04":
                continue
            name_len, extra_len = struct.unpack_from("<HH", head, 26)
            out[info.filename.split("/", 1)[-1]] = (info.header_offset + 30 + name_len + extra_len, info.file_size)
    return out


def stored_placement(files: SourceFiles, path: str, offset: int, length: int, dtype: torch.dtype,
                     numel: int) -> int | None:
    """The file offset of the first element of the contiguous tensor of `numel` elements that the torch.save
    archive at [offset, offset + length) of `path` holds; None when it holds anything else."""
    fd = files.fd(path)
    try:
        records = _stored_records(fd, offset, length)
        order = records.get("byteorder")
        if order and os.pread(fd, order[1], offset + order[0]) != b"little":
            return None
        start, size = records["data.pkl"]
        (key, elements), storage_offset, shape, stride = _Header(io.BytesIO(os.pread(fd, size, offset + start))).load()
    except Exception:  # not an archive, another kind of object, a pickle cut off: not placeable
        return None
    contiguous = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
    itemsize = dtype.itemsize
    if (f"data/{key}" not in records or math.prod(shape) != numel or
            any(st != c for st, c, n in zip(stride, contiguous, shape) if n > 1) or
            records[f"data/{key}"][1] != elements * itemsize or storage_offset + numel > elements):
        return None
    return offset + records[f"data/{key}"][0] + storage_offset * itemsize


def chunk_box(offsets, sizes, shape, path: str, data_offset: int, itemsize: int) -> Box | None:
    """The box of a tensor of `shape` that a row-major chunk [offsets, offsets + sizes) stored at `data_offset`
    fills; None when the chunk is split past the second dim."""
    if len(shape) == 1:
        return Box(offsets[0], sizes[0], 0, 1, path, data_offset, itemsize)
    inner = math.prod(shape[2:])
    if tuple(sizes[2:]) != tuple(shape[2:]):
        return None
    return Box(offsets[0], sizes[0], offsets[1] * inner, sizes[1] * inner, path, data_offset,
               sizes[1] * inner * itemsize)
