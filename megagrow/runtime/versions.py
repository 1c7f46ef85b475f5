"""The installed megatron-core release, as a comparable (major, minor) pair.

Read from the package metadata, so that importing it costs nothing. Only `cpu_compat` and the
adapters in `mcore_adapters` branch on it.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

SUPPORTED = ((0, 16), (0, 19))  # oldest and newest release tested (pyproject's range)


def _mcore_version() -> tuple[int, int]:
    try:
        text = version("megatron-core")
    except PackageNotFoundError:
        import megatron.core
        text = megatron.core.__version__
    major, minor = text.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


MCORE_VERSION = _mcore_version()

# What changed between releases, named for what it is (the only version tests outside cpu_compat).
# 0.19 keeps a torch_dist checkpoint's common state inside the DCP files; older ones read only common.pt.
READS_COMMON_STATE_IN_DCP = MCORE_VERSION >= (0, 19)


def start_checkpoint_writer_manager() -> None:
    """Start dist_checkpointing's writer Manager process now (it is spawned once and reused): 0.19
    made its private getter public (`get_write_results_queue`)."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    getter = getattr(filesystem_async, "get_write_results_queue", None) \
        or getattr(filesystem_async, "_get_write_results_queue")
    getter()
