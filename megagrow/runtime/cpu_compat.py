"""Run megatron-core on a machine without CUDA.

megatron-core asks for CUDA in a handful of places even when the model lives on the CPU (see shared
notes, megatron-core-on-cpu.md). This module redirects exactly those, and is applied only when CUDA
is absent, so a GPU run never goes through it. It is the one place that knows which megatron-core
release needs what: `REDIRECTIONS` lists each redirection with the first release that needs it.

- ``torch.cuda.current_device`` / ``synchronize`` / rng entry points -> the CPU device and generator;
- the model-parallel RNG tracker's private state getters/setters -> the CPU generator;
- tensors created with ``device="cuda"`` (schedules, p2p, optimizer, clipping) and ``.cuda()``
  -> stay on the CPU, via a global TorchFunctionMode;
- ``Tensor.type()`` without arguments reports the CUDA type name, because the distributed optimizer
  and gradient clipping assert ``torch.cuda.*Tensor`` types;
- (0.17+) the gradient buffers wait on ``torch.cuda.current_stream()`` events, and streams and
  events are created for overlap: CPU work is synchronous, so a stream that waits for nothing.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Callable

import torch
from torch.overrides import TorchFunctionMode

from megagrow.runtime.versions import MCORE_VERSION

_applied = False
_CPU = torch.device("cpu")
_TENSOR_CUDA, _TENSOR_TYPE, _TENSOR_TO = torch.Tensor.cuda, torch.Tensor.type, torch.Tensor.to


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return isinstance(device, str) and device.startswith("cuda")


class _CudaToCpuMode(TorchFunctionMode):
    """Maps CUDA device arguments to the CPU; answers ``Tensor.type()`` with CUDA names."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _TENSOR_CUDA:
            return args[0]
        if func is _TENSOR_TYPE and len(args) == 1 and not kwargs:
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if ".cuda." not in name else name
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs = dict(kwargs, device=_CPU)
        if func is _TENSOR_TO and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], _CPU, *args[2:])
        return func(*args, **kwargs)


class _SyncStream:
    """A stream on a synchronous device: every wait is already satisfied."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, stream) -> None:
        pass

    def wait_event(self, event) -> None:
        pass

    def record_event(self, event=None):
        return event or _SyncEvent()

    def synchronize(self) -> None:
        pass


class _SyncEvent:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None) -> None:
        pass

    def wait(self, stream=None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


def _cuda_device_and_rng() -> None:
    torch.cuda.current_device = lambda: _CPU
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    torch.cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    torch.cuda.manual_seed = lambda seed: torch.manual_seed(seed)


def _rng_tracker() -> None:
    from megatron.core.tensor_parallel import random as mp_random

    def get_state(device="cuda", clone=False, graph_safe=False):
        return torch.get_rng_state()  # already a copy

    def set_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    # Forking the tracker's "CUDA" stream now swaps the CPU generator, which the tracker reports.
    logging.getLogger(mp_random.__name__).addFilter(lambda r: "CPU RNG state changed" not in r.getMessage())
    mp_random._get_cuda_rng_state = get_state
    mp_random._set_cuda_rng_state = set_state


def _cuda_arguments() -> None:
    # A mode pushed outside any `with` stays active for the rest of the process.
    _CudaToCpuMode().__enter__()


def _streams_and_events() -> None:
    torch.cuda.current_stream = lambda *a, **k: _SyncStream()
    torch.cuda.default_stream = lambda *a, **k: _SyncStream()
    torch.cuda.Stream = _SyncStream
    torch.cuda.Event = _SyncEvent
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()


# (first megatron-core release that needs it, what it redirects). Applied in this order.
REDIRECTIONS: list[tuple[tuple[int, int], Callable[[], None]]] = [
    ((0, 16), _cuda_device_and_rng),
    ((0, 16), _rng_tracker),
    ((0, 16), _cuda_arguments),
    ((0, 17), _streams_and_events),
]


def apply() -> None:
    """Install the redirections this megatron-core needs (idempotent). Call before it builds anything."""
    global _applied
    if _applied or torch.cuda.is_available():
        return
    _applied = True
    for since, redirect in REDIRECTIONS:
        if MCORE_VERSION >= since:
            redirect()
