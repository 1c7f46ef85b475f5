"""Checkpoint errors and the tracker file (cheap: no torch import)."""

from __future__ import annotations

import os

from megagrow.errors import MegagrowError

TRACKER = "latest_checkpointed_iteration.txt"


class CheckpointError(MegagrowError):
    """A checkpoint that cannot be used as asked; printed as one line."""


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}") if iteration else os.path.join(root, "release")


def read_tracker(root: str) -> int | None:
    """The iteration named by the tracker file (0 for `release`), or None when there is none."""
    path = os.path.join(root, TRACKER)
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        raw = f.read(64)
    try:
        text = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        raise CheckpointError(f"{path}: not a tracker file (binary content)") from None
    if text == "release":
        return 0
    try:
        return int(text)
    except ValueError:
        raise CheckpointError(f"{path}: expected an iteration number, found {text!r}") from None
