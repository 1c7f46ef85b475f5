"""The growth operators, depth, width and learned alike, in one registry, and the spec grammar.

A spec is `NAME[:ARG]`, ARG by default `key=value,key=value` (partial has its own notation):

    stack:g=4            interpolate:g=2         partial:12-3456*5-56 (or partial:1-2,3-6*5,5-6)
    lag:p=2,b=1,init=dup lag:last                redundant    zero    random    learn:steps=200,lr=1e-3
    width: direct  zero  random  fpi  aki  msg:steps=N  pdg:steps=N  learn:steps=N  mixture:init=orthogonal

Depth operators take the new depth from `num_layers` unless the spec fixes it (stack/interpolate g,
partial); width operators the new sizes. A name shared by a depth and a width operator (zero, random,
learn) means the one for the change asked for. mixture grows from two checkpoints (the second: --load-second).
Adding an operator: its class (growth.depth, growth.width, growth.learn, growth.mixture) and one
`OPERATORS.register` line below.
"""

from __future__ import annotations

from megagrow.growth import depth, learn, mixture, width
from megagrow.growth.operators import GrowthError, Operator, Plan, Shared
from megagrow.model.shape import WIDTH_FIELDS, ModelShape
from megagrow.registry import Registry

OPERATORS: Registry[Operator | Shared] = Registry("operator", GrowthError)
OPERATORS.register("stack", depth.Stack())
OPERATORS.register("interpolate", depth.Interpolate())
OPERATORS.register("partial", depth.Partial())
OPERATORS.register("lag", depth.Lag())
OPERATORS.register("redundant", depth.Redundant())
OPERATORS.register("zero", Shared(depth.Zero(), width.Zero()))
OPERATORS.register("random", Shared(depth.Random(), width.Random()))
OPERATORS.register("direct", width.Direct())
OPERATORS.register("fpi", width.Fpi())
OPERATORS.register("aki", width.Aki())
OPERATORS.register("msg", width.Msg())
OPERATORS.register("pdg", width.Pdg())
OPERATORS.register("learn", Shared(learn.LearnDepth(), learn.LearnWidth()))
OPERATORS.register("mixture", mixture.Mixture())

SIZES = ("num_layers",) + WIDTH_FIELDS  # what growth may change


def _operator(name: str, spec: str, old: ModelShape, new: ModelShape) -> Operator:
    """The operator `name` for the change old -> new (no change: depth, whose spec may fix it)."""
    grows_width = any(getattr(old, f) != getattr(new, f) for f in WIDTH_FIELDS)
    if grows_width and old.num_layers != new.num_layers:
        raise GrowthError("grow depth (--num-layers) and width (--hidden-size ...) in two steps, one operator each")
    if grows_width and name not in OPERATORS:
        raise GrowthError(f"--op {name}: unknown width operator (width: {', '.join(names('width'))})")
    variants = {op.kind: op for op in OPERATORS.get(name, f"--op {spec}: ").variants()}
    kind = "width" if grows_width else "depth" if old.num_layers != new.num_layers or "depth" in variants \
        else next(iter(variants))
    if kind not in variants:
        raise GrowthError(f"--op {name} grows {' and '.join(variants)}, not {kind} ({kind} operators: "
                          f"{', '.join(names(kind))})")
    return variants[kind]


def names(kind: str) -> list[str]:
    return [name for name, entry in OPERATORS.items() if any(op.kind == kind for op in entry.variants())]


def plan_growth(spec: str, old: ModelShape, new: ModelShape) -> Plan:
    """Parse `spec` (once), pick its operator for old -> new and plan; `plan.new` is the shape it reaches
    (with the depth the spec fixes when new keeps the old depth)."""
    name, _, arg = spec.strip().partition(":")
    op = _operator(name, spec, old, new)
    return op.plan(op.parse(arg), old, new)


def check_reaches(spec: str, plan: Plan, sizes: dict[str, int | None]) -> None:
    """Refuse a plan whose grown shape is not the one asked for (None: not asked)."""
    for key in SIZES:
        want, got = sizes.get(key), getattr(plan.new, key)
        if want is not None and got != want:
            raise GrowthError(f"--op {spec} makes {key.replace('_', ' ')} {got}, not {want}")


def check_growth(spec: str, old: ModelShape, new: ModelShape) -> None:
    """Raise a one-line GrowthError unless `spec` names a known operator, with valid parameters, that grows
    `old` into exactly `new`. Reads no checkpoint and builds no model."""
    check_reaches(spec, plan_growth(spec, old, new), {key: getattr(new, key) for key in SIZES})


def operators_table() -> str:
    """One line per operator: name, kind, function-preserving, what it does, its parameters."""
    lines = [f"{'operator':<12} {'grows':<6} {'function-preserving':<20} what it does [parameters]"]
    for entry in OPERATORS.values():
        for op in entry.variants():
            lines.append(f"{op.name:<12} {op.kind:<6} {'yes' if op.preserves_function else 'no':<20} {op.summary} "
                         f"[{op.params}]")
    lines.append("depth operators take --num-layers; width operators take --hidden-size/--ffn-hidden-size/"
                 "--num-attention-heads/--num-query-groups")
    return "\n".join(lines)
