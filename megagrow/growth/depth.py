"""Depth growth as layer plans: for each layer of the grown model, where it comes from and how it starts.

Layers are 0-based here; the papers' notation (1-based) appears only in specs and messages.
A plan is a list of `NewLayer`; `copy` layers (and their optimizer state) are exact copies of a
source layer, the other kinds are built from one by `DepthGrownView`. The depth operators (registered
in growth.registry) turn a spec into a plan; each new one is a `DepthOperator` with its `layers`.
Optimizer state follows the plan: copied layers keep their Adam moments (and fp32 main copies); a
tensor an operator sets to zero gets zero moments; a fresh random layer gets zero moments and main
copies equal to its new weights.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

import torch

from megagrow.checkpoint.view import CheckpointView, DerivedView, Unit
from megagrow.growth.operators import GrowthError, Operator, Plan
from megagrow.model.layout import is_norm_weight
from megagrow.model.shape import ModelShape, expected_shapes, zero_centered_gamma


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


_OUTPUT_PROJECTIONS = ("self_attention.linear_proj.weight", "self_attention.linear_proj.bias",
                       "mlp.linear_fc2.weight", "mlp.linear_fc2.bias")
_MAIN_COPIES = ("param", "fp32_param")  # optimizer states that hold the weights themselves


def _zeroed(name: str, init: str) -> bool:
    if init == "zero_out":
        return name in _OUTPUT_PROJECTIONS
    if init == "redundant":  # paper 002: the new layer's norm weights and all its biases are zero
        return "layer_norm" in name or name.endswith(".bias")
    return False


class DepthGrownView(DerivedView):
    """The source view seen through a layer plan (globals pass through)."""

    def __init__(self, inner: CheckpointView, plan: list[NewLayer], args, seed: int):
        super().__init__(inner, args)
        self.plan, self.seed = plan, seed
        self.zero_centered = zero_centered_gamma(args)
        self._last: tuple[int | None, Unit | None] = (None, None)
        self._dtypes: dict[str, torch.dtype] | None = None

    def _source(self, index: int) -> Unit:
        if self._last[0] != index:  # interpolation reads the same layer several times in a row
            self._last = (index, self.inner.read_layer(index))
        return {state: dict(tensors) for state, tensors in self._last[1].items()}

    def read_layer(self, index: int) -> Unit:
        new = self.plan[index]
        if new.init == "random":
            return self._random_layer(index)
        unit = self._source(new.source)
        for state, tensors in unit.items():
            for name, t in tensors.items():
                if _zeroed(name, new.init):
                    # --apply-layernorm-1p stores a norm's scale minus 1: scale 0 is weight -1 (moments stay 0)
                    scale_minus_1 = self.zero_centered and is_norm_weight(name) and state in ("model",) + _MAIN_COPIES
                    tensors[name] = torch.full_like(t, -1.0 if scale_minus_1 else 0.0)
        return unit

    def _random_layer(self, index: int) -> Unit:
        """Initialised as the trainer would (model.init, keyed by seed and the new layer's name)."""
        from megagrow.model.init import init_global_tensor  # imports megatron-core: not needed for planning
        if self._dtypes is None:
            first = self.inner.read_layer(0)
            self._dtypes = {state: next(iter(t.values())).dtype for state, t in first.items() if t}
        a = self.args
        unit: Unit = {"model": {}}
        for name, shape in expected_shapes(a)[1].items():
            weight = init_global_tensor(f"decoder.layers.{index}.{name}", shape, self.seed,
                                        getattr(a, "init_method_std", 0.02), a.num_layers,
                                        getattr(a, "tokenizer_vocab_size", a.padded_vocab_size),
                                        self.zero_centered)
            unit["model"][name] = weight.to(self._dtypes["model"])
            for state in self.optimizer_states:
                dtype = self._dtypes.get(state, torch.float32)
                unit.setdefault(state, {})[name] = (weight.to(dtype) if state in _MAIN_COPIES
                                                    else torch.zeros(shape, dtype=dtype))
        return unit


@dataclass
class LayerPlan(Plan):
    layers: list[NewLayer]

    def change(self) -> str:
        return f"{self.old.num_layers} -> {self.new.num_layers} layers"

    def report(self) -> str:
        return f"layers: {describe(self.layers)}\nconnection rate R_c: {connection_rate(self.layers):.3f}"

    def new_layers(self) -> list[int]:
        """All but the first exact copy of each old layer: zero's and redundant's inserted copies, random layers,
        stacking's and duplication's later repeats."""
        seen, new = set(), []
        for number, layer in enumerate(self.layers, 1):
            if layer.init == "copy" and layer.source not in seen:
                seen.add(layer.source)
            else:
                new.append(number)
        return new


class DepthOperator(Operator):
    """A depth operator is its `layers`: the plan from the old depth and the asked-for one (None: not given)."""
    kind = "depth"

    def layers(self, params: dict[str, str], old: int, target: int | None) -> list[NewLayer]:
        raise NotImplementedError

    def plan(self, params: dict[str, str], old: ModelShape, new: ModelShape) -> LayerPlan:
        target = new.num_layers if new.num_layers != old.num_layers else None  # None: the spec fixes the depth
        layers = self.layers(params, old.num_layers, target)
        if target is not None and len(layers) != target:
            raise GrowthError(f"--op {self.name} makes {len(layers)} layers, not --num-layers {target}")
        if len(layers) <= old.num_layers:
            raise GrowthError(f"--op {self.name} makes {len(layers)} layers from {old.num_layers}: growth cannot "
                              "shrink or keep depth")
        return LayerPlan(self, old, old.with_sizes(num_layers=len(layers)), layers)

    def configure(self, plan: Plan, args, source: CheckpointView) -> list[str]:
        args.num_layers = plan.new.num_layers
        args.decoder_first_pipeline_num_layers = args.decoder_last_pipeline_num_layers = None
        return []

    def view(self, source, plan, args, seed, *, save, force, data_path=None) -> CheckpointView:
        return DepthGrownView(source, plan.layers, args, seed)

    def layer_map(self, plan: LayerPlan) -> list[int] | None:
        return [layer.source for layer in plan.layers] if all(l.init == "copy" for l in plan.layers) else None


def _factor(op: DepthOperator, params: dict, old: int, target: int | None) -> int:
    g = op.int_param(params, "g")
    if g is None:
        if target is None or target % old:
            raise GrowthError(f"{op.name}: give g (e.g. {op.name}:g=2) or a --num-layers that is a multiple of {old}")
        g = target // old
    if g < 2:
        raise GrowthError(f"{op.name}: g={g} must be at least 2")
    if target is not None and target != g * old:
        raise GrowthError(f"{op.name}:g={g} makes {g * old} layers, not --num-layers {target}")
    return g


class Stack(DepthOperator):
    name, preserves_function = "stack", False
    summary = "G_stack: the whole model repeated g times (1..L 1..L ...)"
    params, takes = "g=INT (default: --num-layers / old layers)", ("g",)

    def layers(self, params, old, target):
        return stack(old, _factor(self, params, old, target))


class Interpolate(Stack):
    name, summary = "interpolate", "each layer repeated g times in place (1 1 2 2 ...)"

    def layers(self, params, old, target):
        return interpolate(old, _factor(self, params, old, target))


class Partial(DepthOperator):
    name, preserves_function = "partial", False
    summary = "partial stacking in the papers' notation; reports R_c"
    params, takes = "the layer order: 12-3456*5-56, or ranges 1-2,3-6*5,5-6", ("layers",)

    def parse(self, arg: str) -> dict[str, str]:
        return {"layers": arg}  # its own notation, not key=value

    def layers(self, params, old, target):
        return partial_stack(old, params["layers"])


class Lag(DepthOperator):
    name, preserves_function = "lag", False
    summary = "LAG's design space: k = L'-L new layers from layer p in blocks of b, each block duplicated or random"
    params = "p=INT (first layer, default 1), b=INT (block, default 1), init=dup|random; or last (the top k)"
    takes = ("p", "b", "init", "last")

    def layers(self, params, old, target):
        if target is None:
            raise GrowthError("lag needs --num-layers (the grown depth L')")
        if "last" in params:
            return lag(old, target, None, 0, "dup")
        return lag(old, target, self.int_param(params, "p", 1), self.int_param(params, "b", 1),
                   params.get("init", "dup"))


class Evenly(DepthOperator):
    """New layers inserted evenly (insert_evenly), each built from the layer before as `init` says."""
    init: str

    def layers(self, params, old, target):
        if target is None:
            raise GrowthError(f"{self.name} needs --num-layers (the grown depth)")
        return insert_evenly(old, target, self.init)


class Redundant(Evenly):
    name, init, preserves_function = "redundant", "redundant", True
    summary = ("paper 002: new layers inserted evenly, copies of the layer before with norm weights and biases "
               "zero (identity at growth time)")

    def configure(self, plan, args, source):
        notes = super().configure(plan, args, source)
        if plan.old.swiglu:
            notes.append("warning: with SwiGLU a redundant layer's FFN gets no gradient (its zero pre-MLP norm makes "
                         "silu(0)*0); its attention still trains. --op zero (output projections zero) keeps the whole "
                         "layer trainable.")
        return notes


class Zero(Evenly):
    name, init, preserves_function = "zero", "zero_out", True
    summary = ("G_zero, LLaMA-Pro style: new layers inserted evenly, copies of the layer before with output "
               "projections (linear_proj, linear_fc2) zero")


class Random(Evenly):
    name, init, preserves_function = "random", "random", False
    summary = "G_random: new layers inserted evenly, initialised as the trainer would"
