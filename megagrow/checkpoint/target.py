"""Where a command may write a checkpoint, and how it gets there: the one place that decides.

`--save` must not be, contain, or be contained in the source (symlinks, `..` and trailing slashes
resolved first); `--force` replaces a target only after the new one is complete. The new checkpoint
is written to `SAVE.partial` (a sibling, so the final rename stays on one filesystem), validated by
the caller, then renamed; a replaced target is moved to `SAVE.old` and removed only once the rename
has succeeded. A lock file `SAVE.lock` (flock, so a killed writer never leaves it held) keeps two
commands from writing the same target. No space, permission denied or a read-only filesystem during
the write is one line naming the path, with the partial output removed.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from megagrow.checkpoint.errors import TRACKER, CheckpointError
from megagrow.entry import os_error_line


def _real(path: str) -> str:
    return os.path.realpath(os.path.abspath(os.path.expanduser(path)))


def _within(inner: str, outer: str) -> bool:
    return inner == outer or inner.startswith(outer.rstrip(os.sep) + os.sep)


def source_roots(load: str) -> list[str]:
    """The directories that are the source: --load itself and, for an iteration directory, its root."""
    real = _real(load)
    parent = os.path.dirname(real)
    return [real, parent] if os.path.isfile(os.path.join(parent, TRACKER)) else [real]


def mount_point(path: str) -> str:
    path = _real(path)
    while not os.path.ismount(path):
        path = os.path.dirname(path)
    return path


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


@dataclass(frozen=True)
class Target:
    """A checked --save: the real path, and the partial/old/lock siblings next to it."""
    save: str  # as the user wrote it (for messages)
    final: str

    @property
    def partial(self) -> str:
        return self.final + ".partial"

    @property
    def old(self) -> str:
        return self.final + ".old"

    @property
    def lock(self) -> str:
        return self.final + ".lock"


def check_target(save: str, force: bool, load: str | None = None) -> Target:
    """Refuse a --save that may not be written (before anything is read or written)."""
    if save is None or not str(save).strip():
        raise CheckpointError("--save is empty: name the directory to write the checkpoint to")
    final = _real(save)
    for root in source_roots(load) if load else []:
        if _within(final, root):
            raise CheckpointError(f"--save {save} is {'the source' if final == root else 'inside the source'} "
                                  f"{root}; the source is never modified")
        if _within(root, final):
            raise CheckpointError(f"--save {save} contains the source {root}; replacing it would delete the source")
    if os.path.exists(final) and not os.path.isdir(final):
        raise CheckpointError(f"--save {save}: exists and is not a directory")
    held = os.path.isdir(final) and os.listdir(final) or (not os.path.exists(final) and os.path.isdir(final + ".old"))
    if held and not force:  # (a target moved aside by a killed writer comes back: it counts as there)
        raise CheckpointError(f"--save {save}: directory exists and is not empty (pass --force to replace it)")
    parent = os.path.dirname(final)
    if os.path.exists(parent) and not os.path.isdir(parent):
        raise CheckpointError(f"--save {save}: {parent} is not a directory")
    return Target(save, final)


def check_space(target: Target, need_bytes: int) -> None:
    """Refuse before writing when the filesystem holding the target cannot take `need_bytes`."""
    where = target.final if os.path.isdir(target.final) else os.path.dirname(target.final)
    while not os.path.isdir(where):
        where = os.path.dirname(where)
    free = shutil.disk_usage(where).free
    if need_bytes > free:
        raise CheckpointError(f"no space left on {mount_point(where)} for --save {target.save}: needs about "
                              f"{_gb(need_bytes)}, {_gb(free)} free; nothing was written")


@contextmanager
def _locked(target: Target) -> Iterator[None]:
    while True:
        fd = os.open(target.lock, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise CheckpointError(f"--save {target.save}: another command is writing it right now "
                                  f"(lock {target.lock}); wait for it to finish") from None
        try:  # the file we locked may have been removed by a writer that just finished: lock the new one
            if os.fstat(fd).st_ino == os.stat(target.lock).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        try:
            os.unlink(target.lock)
        except FileNotFoundError:
            pass
        os.close(fd)


def _recover(target: Target) -> None:
    """Undo what a killed writer left: a target moved aside but not replaced comes back; partials go."""
    if os.path.isdir(target.old):
        if os.path.exists(target.final):
            shutil.rmtree(target.old)
        else:
            os.replace(target.old, target.final)
    shutil.rmtree(target.partial, ignore_errors=True)


def _no_space_line(target: Target, e: BaseException) -> str | None:
    """torch's zip writer reports a full disk as a RuntimeError; say what it was."""
    if isinstance(e, OSError):
        line = os_error_line(e, f"writing --save {target.save}")
        return f"{line}; nothing was written" if line else None
    if isinstance(e, RuntimeError) and any(s in str(e) for s in ("unexpected pos", "failed writing", "file write")):
        free = shutil.disk_usage(os.path.dirname(target.final)).free
        if free < 64 << 20:
            return f"no space left on {mount_point(target.final)} while writing --save {target.save}; " \
                   "nothing was written"
    return None


@contextmanager
def writing(target: Target, need_bytes: int = 0) -> Iterator[str]:
    """Yield the partial directory to write into; on success rename it into place (replacing atomically)."""
    os.makedirs(os.path.dirname(target.final), exist_ok=True)
    with _locked(target):
        _recover(target)
        if need_bytes:
            check_space(target, need_bytes)
        try:
            os.makedirs(target.partial)
            yield target.partial
            if os.path.exists(target.final):
                os.replace(target.final, target.old)
                os.replace(target.partial, target.final)
                shutil.rmtree(target.old)
            else:
                os.replace(target.partial, target.final)
        except BaseException as e:
            shutil.rmtree(target.partial, ignore_errors=True)
            line = _no_space_line(target, e)
            if line:
                raise CheckpointError(line) from None
            raise

