"""megatron-core's fused kernels compiled on first use, not at import.

megatron-core decorates its fused element-wise kernels (`megatron.core.jit.jit_fuser`, the MoE router) with
`torch.compile` as its modules load. Decorating imports torch's whole compiler stack (dynamo, inductor: 2-4 s
of every process's start, each rank of every job step) although compilation itself only happens at a
kernel's first call, and most runs never call one. `install()` (called from megagrow's package init, before
anything imports megatron-core) makes `torch.compile`, while the `megatron.core` package loads, a decorator
that compiles at the first call. What runs and what is compiled stay the same; only the import moves.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import sys

_PACKAGE = "megatron.core"


def deferred(compile_fn):
    """`compile_fn` (torch.compile), applied at a function's first call instead of its definition."""

    def decorate(fn=None, **options):
        if fn is None:  # used as @jit_fuser(...)
            return lambda f: decorate(f, **options)
        if not callable(fn) or not hasattr(fn, "__code__"):  # modules and the like: as torch.compile does
            return compile_fn(fn, **options)
        compiled = None

        @functools.wraps(fn)
        def call(*args, **kwargs):
            nonlocal compiled
            if compiled is None:
                compiled = compile_fn(fn, **options)
            return compiled(*args, **kwargs)

        return call

    return decorate


class _DeferWhileLoading(importlib.abc.Loader):
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        import torch
        real = torch.compile
        torch.compile = deferred(real)
        try:
            self.loader.exec_module(module)
        finally:
            torch.compile = real


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != _PACKAGE:
            return None
        sys.meta_path.remove(self)  # once, and out of the way of the real lookup below
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _DeferWhileLoading(spec.loader)
        return spec


def install() -> None:
    if _PACKAGE not in sys.modules and not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
