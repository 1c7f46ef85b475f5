"""megatron-core's torch.compile'd kernels compile at their first call, and importing the trainer does not
import torch's compiler stack."""

import subprocess
import sys

import torch

from conftest import ROOT
from megagrow.runtime.deferred_compile import deferred


def test_compiles_once_at_the_first_call():
    calls = []

    def fake_compile(fn, **options):
        calls.append(options)
        return lambda *a, **k: fn(*a, **k) * 10

    decorate = deferred(fake_compile)

    @decorate
    def double(x):
        return 2 * x

    @decorate(dynamic=False)
    def triple(x):
        return 3 * x

    assert calls == []  # decorating compiles nothing
    assert double(1) == 20 and double(2) == 40 and triple(1) == 30
    assert calls == [{}, {"dynamic": False}]  # each compiled once, with its options
    assert double.__name__ == "double"
    module = torch.nn.Linear(2, 2)
    assert decorate(module) is not module and len(calls) == 3  # modules: compiled at once, as torch.compile does


def test_the_trainer_imports_without_the_compiler():
    code = ("import sys, megagrow.training.pretrain, megatron.core.jit as jit, torch; "
            "assert 'torch._dynamo' not in sys.modules and 'torch._inductor.compile_fx' not in sys.modules; "
            "assert jit.jit_fuser is not torch.compile and torch.compile.__module__ == 'torch'")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
