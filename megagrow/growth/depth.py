"""Depth growth as layer plans: for each layer of the grown model, where it comes from and how it starts.

Layers are 0-based here; the papers' notation (1-based) appears only in specs and messages.
A plan is a list of `NewLayer`; `copy` layers (and their optimizer state) are exact copies of a
source layer, the other kinds are built from one by `growth.grow`.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

from megagrow.checkpoint.errors import CheckpointError


class GrowthError(CheckpointError):
    """A growth spec or target shape that cannot be applied; printed as one line."""


@dataclass(frozen=True)
class NewLayer:
    source: int | None  # old layer (0-based) it is built from; None for a fresh random layer
    init: str = "copy"  # copy | random | zero_out (output projections zero) | redundant (norms, biases zero)

    def __str__(self) -> str:
        if self.init == "copy":
            return str(self.source + 1)
        if self.init == "random":
            return "R"
        return {"zero_out": "Z", "redundant": "I"}[self.init] + str(self.source + 1)


def describe(plan: list[NewLayer]) -> str:
    return " ".join(str(layer) for layer in plan)


def stack(num_layers: int, g: int) -> list[NewLayer]:
    """G_stack: the whole model repeated g times (1..L 1..L ...)."""
    return [NewLayer(i) for _ in range(g) for i in range(num_layers)]


def interpolate(num_layers: int, g: int) -> list[NewLayer]:
    """Each layer repeated g times in place (1 1 2 2 3 3)."""
    return [NewLayer(i) for i in range(num_layers) for _ in range(g)]


_DIGITS = re.compile(r"^[1-9]+(\*\d+)?$")
_RANGE = re.compile(r"^(\d+)(?:-(\d+))?(?:\*(\d+))?$")


def partial_stack(num_layers: int, spec: str) -> list[NewLayer]:
    """Partial stacking in the papers' notation: `12-3456*5-56` (digits name layers 1..9; `-` joins
    segments, `*k` repeats one), or with ranges for any depth: `1-2,3-6*5,5-6`."""
    layers = []
    if "," in spec or not all(_DIGITS.match(s) for s in spec.split("-")):
        for segment in spec.split(","):
            m = _RANGE.match(segment.strip())
            if not m:
                raise GrowthError(f"partial:{spec}: cannot read segment {segment!r} (expected A, A-B, A*K or A-B*K)")
            first, last, times = int(m.group(1)), int(m.group(2) or m.group(1)), int(m.group(3) or 1)
            if not 1 <= first <= last <= num_layers:
                raise GrowthError(f"partial:{spec}: layers {first}-{last} are outside 1..{num_layers}")
            layers += list(range(first - 1, last)) * times
    else:
        for segment in spec.split("-"):
            digits, _, times = segment.partition("*")
            picked = [int(c) - 1 for c in digits]
            if any(i >= num_layers for i in picked):
                raise GrowthError(f"partial:{spec}: layer {max(picked) + 1} does not exist in a {num_layers}-layer "
                                  "model (use ranges, e.g. 1-2,3-6*5,5-6, beyond 9 layers)")
            layers += picked * int(times or 1)
    return [NewLayer(i) for i in layers]


def lag(num_layers: int, target_layers: int, p: int | None, b: int, init: str) -> list[NewLayer]:
    """LAG's design space: k = L'-L consecutive old layers from p (1-based), split into blocks of b,
    each followed by a duplicate of itself (init=dup) or b random layers (init=random).
    p=None means `last`: the last k layers, one block, stacked on top."""
    k = target_layers - num_layers
    if k < 1:
        raise GrowthError(f"lag: --num-layers {target_layers} must exceed the model's {num_layers} layers")
    if k > num_layers:
        raise GrowthError(f"lag: k = {k} new layers needs k consecutive old layers; the model has {num_layers}")
    if p is None:
        p, b = num_layers - k + 1, k
    if not 1 <= p <= num_layers - k + 1:
        raise GrowthError(f"lag: p={p} is out of range 1..{num_layers - k + 1} for k={k}")
    if b < 1 or k % b:
        raise GrowthError(f"lag: block size b={b} does not divide k={k}")
    if init not in ("dup", "random"):
        raise GrowthError(f"lag: init={init}: expected dup or random")
    plan = [NewLayer(i) for i in range(p - 1)]
    for start in range(p - 1, p - 1 + k, b):
        block = list(range(start, start + b))
        plan += [NewLayer(i) for i in block]
        plan += [NewLayer(i) if init == "dup" else NewLayer(None, "random") for i in block]
    plan += [NewLayer(i) for i in range(p - 1 + k, num_layers)]
    return plan


def insert_evenly(num_layers: int, target_layers: int, init: str) -> list[NewLayer]:
    """k = L'-L new layers spread evenly, each after old layer ceil((j+1)L/k) and built from it
    (LLaMA-Pro's placement: 32 + 8 puts one after every 4th layer)."""
    k = target_layers - num_layers
    if k < 1:
        raise GrowthError(f"--num-layers {target_layers} must exceed the model's {num_layers} layers")
    after = Counter(-(-(j + 1) * num_layers // k) - 1 for j in range(k))
    plan = []
    for i in range(num_layers):
        plan.append(NewLayer(i))
        for _ in range(after.get(i, 0)):
            plan.append(NewLayer(None if init == "random" else i, init))
    return plan


def connection_rate(plan: list[NewLayer]) -> float:
    """R_c: adjacent pairs of the grown model that were adjacent (in order) in the small one."""
    if len(plan) < 2:
        return 1.0
    kept = sum(1 for a, b in zip(plan, plan[1:])
               if a.source is not None and b.source is not None and b.source == a.source + 1)
    return kept / (len(plan) - 1)
