"""Checkpoint errors and the cheap checks that need no megatron-core import."""

from __future__ import annotations

import os

TRACKER = "latest_checkpointed_iteration.txt"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as asked; printed as one line."""


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}") if iteration else os.path.join(root, "release")


def read_tracker(root: str) -> int | None:
    """The iteration named by the tracker file (0 for `release`), or None when there is none."""
    path = os.path.join(root, TRACKER)
    if not os.path.isfile(path):
        return None
    text = open(path).read().strip()
    if text == "release":
        return 0
    try:
        return int(text)
    except ValueError:
        raise CheckpointError(f"{path}: expected an iteration number, found {text!r}") from None


def detect_format(it_dir: str) -> str | None:
    """'torch_dist', 'torch' (legacy mp_rank_* shards) or None, for one iteration directory."""
    if os.path.isfile(os.path.join(it_dir, "metadata.json")) or os.path.isfile(os.path.join(it_dir, ".metadata")):
        return "torch_dist"
    if any(n.startswith("mp_rank_") for n in os.listdir(it_dir)):
        return "torch"
    return None


def check_loadable(root: str, same_as_save: bool = False) -> None:
    """Fail fast on a --load that is not a checkpoint directory.

    `--load X --save X` on a fresh X is Megatron's requeue pattern: allowed, it starts from scratch.
    """
    if same_as_save and (not os.path.exists(root) or (os.path.isdir(root) and not os.listdir(root))):
        return
    if not os.path.isdir(root):
        raise CheckpointError(f"--load {root}: no such directory")
    iteration = read_tracker(root)
    if iteration is None:
        raise CheckpointError(f"--load {root}: not a checkpoint directory (no {TRACKER})")
    path = iteration_dir(root, iteration)
    if not os.path.isdir(path):
        raise CheckpointError(f"--load {root}: {TRACKER} names {os.path.basename(path)}, which does not exist")
    if detect_format(path) is None:
        raise CheckpointError(f"--load {root}: {path} holds neither a torch_dist nor a torch checkpoint")
