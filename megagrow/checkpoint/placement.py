"""Tensors whose bytes already lie in files, moved between on-disk formats without being read into tensors.

A `Placement` says where every element of one (unsharded) tensor is stored: boxes over the tensor's 2-D view
(rows x the product of its other dims), each a row-major rectangle in a file at a byte offset, `stride` bytes from
one stored row to the next. Views that know where their tensors lie offer placements (Hugging Face safetensors,
torch_dist chunks); a writer cuts what a target file holds out of them, with the layout functions applied to row
numbers (`take_rows`) and the tensor-parallel boxes (`crop`), and `copy_to` moves the bytes: one in-kernel copy
per run of whole rows, other boxes gathered a block of rows at a time in a reused buffer. Nothing is
deserialised or cast, so a conversion costs about what copying the files does.
"""

from __future__ import annotations

import errno
import math
import os
import threading
from dataclasses import dataclass, replace
from typing import Sequence

import torch

from megagrow.checkpoint.errors import CheckpointError

IOV_MAX = 1024  # buffers one preadv or pwritev takes (Linux)
GATHER_BLOCK = 1 << 20  # bytes of target rows assembled at a time: small enough to stay in cache, so the write is cheap


@dataclass(frozen=True)
class Box:
    row: int  # the first row of the tensor's 2-D view it holds
    rows: int
    col: int  # the first column
    cols: int
    path: str
    offset: int  # where element (row, col) is stored
    stride: int  # bytes from one stored row to the next


@dataclass(frozen=True)
class Placement:
    shape: tuple[int, ...]
    dtype: torch.dtype
    boxes: tuple[Box, ...]

    @classmethod
    def stored(cls, path: str, offset: int, shape: Sequence[int], dtype: torch.dtype) -> "Placement":
        """A tensor stored whole and row-major at `offset` of `path`."""
        shape = tuple(shape)
        width = math.prod(shape[1:]) if len(shape) > 1 else 1
        return cls(shape, dtype, (Box(0, shape[0] if shape else 1, 0, width, path, offset, width * dtype.itemsize),))

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    @property
    def width(self) -> int:
        return math.prod(self.shape[1:]) if len(self.shape) > 1 else 1

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.itemsize

    def _cut(self, row: int, rows: int, col: int, cols: int, to_row: int) -> list[Box]:
        """The stored pieces of rows [row, row+rows) x columns [col, col+cols), placed from row `to_row` on."""
        out = []
        for b in self.boxes:
            r0, r1 = max(b.row, row), min(b.row + b.rows, row + rows)
            c0, c1 = max(b.col, col), min(b.col + b.cols, col + cols)
            if r0 < r1 and c0 < c1:
                out.append(Box(to_row + r0 - row, r1 - r0, c0 - col, c1 - c0, b.path,
                               b.offset + (r0 - b.row) * b.stride + (c0 - b.col) * self.itemsize, b.stride))
        return out

    def take_rows(self, rows: Sequence[int]) -> "Placement":
        """self[rows] along the first dim (a layout function applied to row numbers gives `rows`)."""
        boxes, start = [], 0
        while start < len(rows):  # runs of consecutive rows cut as one piece
            end = start + 1
            while end < len(rows) and rows[end] == rows[end - 1] + 1:
                end += 1
            boxes += self._cut(rows[start], end - start, 0, self.width, start)
            start = end
        return Placement((len(rows),) + self.shape[1:], self.dtype, tuple(boxes))

    def crop(self, offsets: Sequence[int], sizes: Sequence[int]) -> "Placement | None":
        """The box [offsets, offsets + sizes) (a tensor-parallel chunk); None when it is not a box of the 2-D view
        (a split past the second dim)."""
        if len(self.shape) > 2 and tuple(sizes[2:]) != self.shape[2:]:
            return None
        col, cols = (offsets[1] * math.prod(self.shape[2:]), math.prod(sizes[1:])) if len(self.shape) > 1 \
            else (0, 1)
        return Placement(tuple(sizes), self.dtype, tuple(self._cut(offsets[0], sizes[0], col, cols, 0)))

    def copy_to(self, fd: int, offset: int, files: "SourceFiles") -> None:
        """Write the tensor, row-major and contiguous, at `offset` of `fd`."""
        row_bytes = self.width * self.itemsize
        if sum(b.rows * b.cols for b in self.boxes) != math.prod(self.shape):
            raise CheckpointError(f"a placement of {self.shape} covers {sum(b.rows * b.cols for b in self.boxes)} "
                                  "elements")
        gathered = []
        for b in self.boxes:
            if b.col == 0 and b.cols == self.width and b.stride == row_bytes:  # whole rows, stored together
                files.copy_range(b.path, b.offset, fd, offset + b.row * row_bytes, b.rows * row_bytes)
            else:
                gathered.append(b)
        if gathered:
            _gather(gathered, row_bytes, self.itemsize, fd, offset, files)


def concat(parts: Sequence[Placement]) -> Placement:
    """The parts stacked along the first dim (the Hugging Face tensors a fused Megatron tensor is made of)."""
    boxes, row = [], 0
    for p in parts:
        if p.dtype != parts[0].dtype or p.width != parts[0].width:
            raise ValueError("parts of another dtype or row length")
        boxes += [replace(b, row=b.row + row) for b in p.boxes]
        row += p.shape[0]
    return Placement((row,) + parts[0].shape[1:], parts[0].dtype, tuple(boxes))


def _gather(boxes: list[Box], row_bytes: int, itemsize: int, fd: int, offset: int, files: "SourceFiles") -> None:
    """Rows not stored together, a block of rows at a time (each piece read once). Whole target rows stored apart
    are read as a span and written row by row in one call; rows made of pieces are assembled in a block (pieces
    stored row after row are read straight into their places), then written."""
    block = max(1, min(IOV_MAX, GATHER_BLOCK // row_bytes))
    for b in boxes:
        if b.cols * itemsize != row_bytes:
            continue
        for r in range(b.row, b.row + b.rows, block):
            n = min(block, b.row + b.rows - r)
            span = files.read(b.path, b.offset + (r - b.row) * b.stride, (n - 1) * b.stride + row_bytes)
            rows = memoryview(span.numpy())
            files.write_rows(fd, [rows[k * b.stride:k * b.stride + row_bytes] for k in range(n)],
                             offset + r * row_bytes)
    pieces = [b for b in boxes if b.cols * itemsize != row_bytes]
    out = files.buffer("out", block * row_bytes)
    out_bytes = memoryview(out.numpy())
    for first, last in _merged(sorted({(b.row, b.row + b.rows) for b in pieces})):
        for r in range(first, last, block):
            n = min(block, last - r)
            for b in pieces:
                r0, r1 = max(b.row, r), min(b.row + b.rows, r + n)
                if r0 >= r1:
                    continue
                width, start = b.cols * itemsize, b.offset + (r0 - b.row) * b.stride
                places = [(k - r) * row_bytes + b.col * itemsize for k in range(r0, r1)]
                if b.stride == width:  # stored row after row
                    files.read_into(b.path, start, [out_bytes[p:p + width] for p in places])
                else:
                    span = files.read(b.path, start, (r1 - r0 - 1) * b.stride + width)
                    out[:n * row_bytes].view(n, row_bytes)[r0 - r:r1 - r, b.col * itemsize:][:, :width].copy_(
                        span.as_strided((r1 - r0, width), (b.stride, 1)))
            files.write(fd, out[:n * row_bytes], offset + r * row_bytes)


def _merged(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for a, b in spans:
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


class SourceFiles:
    """The open source files of one conversion and each thread's reused buffers (close() at the end)."""

    def __init__(self):
        self.fds: dict[str, int] = {}
        self._lock = threading.Lock()
        self._local = threading.local()

    def fd(self, path: str) -> int:
        with self._lock:
            if path not in self.fds:
                self.fds[path] = os.open(path, os.O_RDONLY)
            return self.fds[path]

    def buffer(self, name: str, nbytes: int) -> torch.Tensor:
        buffers = self._local.__dict__.setdefault("buffers", {})
        if name not in buffers or buffers[name].numel() < nbytes:
            buffers[name] = torch.empty(nbytes, dtype=torch.uint8)
        return buffers[name]

    def read(self, path: str, offset: int, length: int) -> torch.Tensor:
        """`length` bytes of `path` from `offset`, in this thread's input buffer."""
        buf = self.buffer("in", length)[:length]
        self.read_into(path, offset, [memoryview(buf.numpy())])
        return buf

    def read_into(self, path: str, offset: int, places: list[memoryview]) -> None:
        """Consecutive bytes of `path` from `offset` into `places`, in order."""
        _all_of(os.preadv, self.fd(path), places, offset, f"{path}: ends before a tensor does")

    @staticmethod
    def write_rows(fd: int, rows: list[memoryview], offset: int) -> None:
        """`rows`, one after another, at `offset`."""
        _all_of(os.pwritev, fd, rows, offset, "a write wrote nothing")

    @staticmethod
    def write(fd: int, data: torch.Tensor, offset: int) -> None:
        _all_of(os.pwritev, fd, [memoryview(data.contiguous().view(-1).view(torch.uint8).numpy())], offset,
                "a write wrote nothing")

    def copy_range(self, path: str, src_offset: int, fd: int, dst_offset: int, length: int) -> None:
        copy_range(self.fd(path), fd, src_offset, dst_offset, length)

    def close(self) -> None:
        with self._lock:
            for fd in self.fds.values():
                os.close(fd)
            self.fds.clear()

    def __enter__(self) -> "SourceFiles":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _all_of(call, fd: int, buffers: list[memoryview], offset: int, stopped: str) -> None:
    """preadv/pwritev until every buffer is done (the kernel may do part of them)."""
    first = 0
    while first < len(buffers):
        n = call(fd, buffers[first:first + IOV_MAX], offset)
        if n == 0:
            raise CheckpointError(stopped)
        offset += n
        while first < len(buffers) and n >= buffers[first].nbytes:
            n -= buffers[first].nbytes
            first += 1
        if n:
            buffers[first] = buffers[first][n:]


# copy_file_range refuses some pairs of filesystems (EXDEV: project space -> scratch, tmpfs...);
# those get a streamed copy, the same bytes.
_NO_COPY_FILE_RANGE = {errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF}
_STREAM_BLOCK = 16 << 20


def copy_range(src: int, dst: int, src_offset: int, dst_offset: int, length: int) -> None:
    """Copy bytes between open files in the kernel (copy_file_range), streamed where it refuses."""
    while length > 0:
        try:
            n = os.copy_file_range(src, dst, length, src_offset, dst_offset)
        except OSError as e:
            if e.errno not in _NO_COPY_FILE_RANGE:
                raise
            return _stream_range(src, dst, src_offset, dst_offset, length)
        if n == 0:
            raise CheckpointError(f"a file ended {length} bytes early")
        src_offset, dst_offset, length = src_offset + n, dst_offset + n, length - n


def _stream_range(src: int, dst: int, src_offset: int, dst_offset: int, length: int) -> None:
    while length > 0:
        block = os.pread(src, min(length, _STREAM_BLOCK), src_offset)
        if not block:
            raise CheckpointError(f"a file ended {length} bytes early")
        view = memoryview(block)
        while view:
            n = os.pwrite(dst, view, dst_offset)
            view, dst_offset = view[n:], dst_offset + n
        src_offset, length = src_offset + len(block), length - len(block)
