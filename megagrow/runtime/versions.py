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


def collect_write_results_in_process() -> None:
    """dist_checkpointing's torch_dist writer hands its results to the saving rank through a queue that
    megatron-core makes, by default, in a spawned multiprocessing Manager, built for async saves. megagrow's
    saves are synchronous (it refuses --async-save): the writer runs in the rank itself, so a plain queue
    serves. The Manager would cost each rank another process that imports torch again when the first
    results arrive (seconds of CPU and about 0.7 GB), and that SLURM's SIGTERM to the step kills mid-save.
    Same private global (`_results_queue`) in every supported release."""
    import queue
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()
