"""The operator registry and spec grammar: `NAME[:ARG]` or `NAME:key=value,key=value`.

    stack:g=4            interpolate:g=2         partial:12-3456*5-56 (or partial:1-2,3-6*5,5-6)
    lag:p=2,b=1,init=dup lag:last                redundant    zero    random    learn:steps=200,lr=1e-3
    (width, with --hidden-size/--ffn-hidden-size/--num-attention-heads: direct, zero, random, fpi, aki,
     msg:steps=N, pdg:steps=N, learn:steps=N; growth.width; learn: growth.learn)

Depth operators need the new depth from `--num-layers` unless the spec fixes it (stack/interpolate
g, partial). Each operator says what it changes and whether the grown model computes the same
function as the small one at growth time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from megagrow.growth import depth, learn
from megagrow.growth.depth import GrowthError, NewLayer


@dataclass(frozen=True)
class Operator:
    name: str
    dimension: str  # depth | width
    preserves_function: bool
    summary: str
    plan: Callable[[int, int | None, dict], list[NewLayer]] | None  # (old layers, --num-layers, params)


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    name, _, rest = spec.strip().partition(":")
    if name == "partial":
        return name, {"layers": rest}
    params = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        params[key.strip()] = value.strip() if eq else ""
    return name, params


def _int(params: dict, key: str, spec: str, default: int | None = None) -> int | None:
    if key not in params:
        return default
    try:
        return int(params[key])
    except ValueError:
        raise GrowthError(f"{spec}: {key}={params[key]!r} is not an integer") from None


def _factor(old: int, target: int | None, params: dict, name: str) -> int:
    g = _int(params, "g", name)
    if g is None:
        if target is None or target % old:
            raise GrowthError(f"{name}: give g (e.g. {name}:g=2) or a --num-layers that is a multiple of {old}")
        g = target // old
    if g < 2:
        raise GrowthError(f"{name}: g={g} must be at least 2")
    if target is not None and target != g * old:
        raise GrowthError(f"{name}:g={g} makes {g * old} layers, not --num-layers {target}")
    return g


def _lag(old: int, target: int | None, params: dict) -> list[NewLayer]:
    if target is None:
        raise GrowthError("lag needs --num-layers (the grown depth L')")
    if "last" in params:
        return depth.lag(old, target, None, 0, "dup")
    unknown = set(params) - {"p", "b", "init"}
    if unknown:
        raise GrowthError(f"lag: unknown parameter {sorted(unknown)[0]} (expected p, b, init or last)")
    return depth.lag(old, target, _int(params, "p", "lag", 1), _int(params, "b", "lag", 1), params.get("init", "dup"))


def _evenly(init: str):
    def plan(old: int, target: int | None, params: dict) -> list[NewLayer]:
        if target is None:
            raise GrowthError("this operator needs --num-layers (the grown depth)")
        return depth.insert_evenly(old, target, init)
    return plan


OPERATORS: dict[str, Operator] = {op.name: op for op in [
    Operator("stack", "depth", False, "G_stack: the whole model repeated g times (1..L 1..L ...)",
             lambda old, target, p: depth.stack(old, _factor(old, target, p, "stack"))),
    Operator("interpolate", "depth", False, "each layer repeated g times in place (1 1 2 2 ...)",
             lambda old, target, p: depth.interpolate(old, _factor(old, target, p, "interpolate"))),
    Operator("partial", "depth", False, "partial stacking in the papers' notation (12-3456*5-56); reports R_c",
             lambda old, target, p: depth.partial_stack(old, p["layers"])),
    Operator("lag", "depth", False, "LAG design space: k new layers from p in blocks of b, init dup|random; or last",
             _lag),
    Operator("redundant", "depth", True, "paper 002: new layers inserted evenly, copies of the layer before with "
             "norm weights and biases zero (identity at growth time)", _evenly("redundant")),
    Operator("zero", "depth", True, "G_zero, LLaMA-Pro style: new layers inserted evenly, copies of the layer "
             "before with output projections (linear_proj, linear_fc2) zero", _evenly("zero_out")),
    Operator("random", "depth", False, "G_random: new layers inserted evenly, initialised as the trainer would",
             _evenly("random")),
    Operator("learn", "depth", False, "G_learn, LiGO (learn:steps=N[,lr=X]): each new layer a learned linear mix of "
             "the old ones, from stacking, fitted N steps on the grown model's LM loss",
             learn.initial_depth_plan),
]}


def depth_plan(spec: str, old_layers: int, target_layers: int | None) -> list[NewLayer]:
    name, params = parse_spec(spec)
    op = OPERATORS.get(name)
    if op is None:
        raise GrowthError(f"--op {spec}: unknown operator {name!r} (see megagrow ops list)")
    if op.plan is None:
        raise GrowthError(f"--op {spec}: {op.dimension} growth with {name} is not implemented yet")
    plan = op.plan(old_layers, target_layers, params)
    if target_layers is not None and len(plan) != target_layers:
        raise GrowthError(f"--op {spec} makes {len(plan)} layers, not --num-layers {target_layers}")
    if len(plan) <= old_layers:
        raise GrowthError(f"--op {spec} makes {len(plan)} layers from {old_layers}: growth cannot shrink or keep depth")
    return plan
