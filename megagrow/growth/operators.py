"""What a growth operator is: one protocol for depth, width and learned growth.

An operator has a name, a kind (depth | width), whether the grown model computes the same function at
growth time, a one-line summary and a description of its parameters. Growing is two steps:
- `plan(params, old, new)`: the spec's parsed parameters and the old and new `ModelShape` become a plan;
  everything that can be checked without reading weights is checked here (one-line `GrowthError`).
- `view(source, plan, args, seed, ...)`: the grown view over the source checkpoint, written once.
Depth operators live in growth.depth, width operators in growth.width, learned growth in growth.learn;
growth.registry registers them and parses specs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from megagrow.checkpoint.errors import CheckpointError
from megagrow.model.shape import ModelShape

if TYPE_CHECKING:
    from megagrow.checkpoint.view import CheckpointView


class GrowthError(CheckpointError):
    """A growth spec or target shape that cannot be applied; printed as one line."""


@dataclass
class Plan:
    """What `op` will do to grow `old` into `new` (the shape it reaches)."""
    op: "Operator"
    old: ModelShape
    new: ModelShape

    def change(self) -> str:
        """The change in a few words (the progress label)."""
        raise NotImplementedError

    def report(self) -> str:
        """Lines for the user once grown."""
        return self.change()

    def new_layers(self) -> list[int] | None:
        """The grown model's new layers (1-based), for training only them; None: the plan does not tell them apart."""
        return None


class Operator:
    name: str
    kind: str  # depth | width
    preserves_function: bool
    summary: str
    params: str = "none"
    takes: tuple[str, ...] = ()  # the parameter names it accepts
    reads_data = False  # fitted on training data (--data-path)
    sources = 1  # checkpoints it grows from (mixture: 2, the second given as --load-second)

    def parse(self, arg: str) -> dict[str, str]:
        """The spec after `NAME:`, by default `key=value,key=value` (a bare key has the value "")."""
        params = {}
        for item in filter(None, arg.split(",")):
            key, eq, value = item.partition("=")
            params[key.strip()] = value.strip() if eq else ""
        unknown = sorted(set(params) - set(self.takes))
        if unknown:
            raise GrowthError(f"{self.name}: unknown parameter {unknown[0]} "
                              f"({'expected ' + ', '.join(self.takes) if self.takes else 'it takes none'})")
        return params

    def int_param(self, params: dict, key: str, default: int | None = None) -> int | None:
        if key not in params:
            return default
        try:
            return int(params[key])
        except ValueError:
            raise GrowthError(f"{self.name}: {key}={params[key]!r} is not an integer") from None

    def plan(self, params: dict[str, str], old: ModelShape, new: ModelShape) -> Plan:
        """Check and plan growing `old` into `new`; a depth operator whose spec fixes the depth gets new == old."""
        raise NotImplementedError

    def configure(self, plan: Plan, args, source: "CheckpointView") -> list[str]:
        """Give the target's args (the source's, at the target layout) the grown shape; returns notes for the user."""
        raise NotImplementedError

    def view(self, source: "CheckpointView", plan: Plan, args, seed: int, *, save: str, force: bool,
             data_path: list[str] | None = None) -> "CheckpointView":
        """The grown checkpoint as a view over `source` (`save`, `force`: for operators that refuse early);
        an operator of two sources also gets `second`, the second checkpoint's view."""
        raise NotImplementedError

    def layer_map(self, plan: Plan) -> list[int] | None:
        """For each new layer the old layer it is an exact copy of (stored chunks can be copied), else None."""
        return None

    def written(self, view: "CheckpointView", save: str) -> None:
        """After the grown checkpoint is written (e.g. records beside it)."""

    def variants(self) -> list["Operator"]:
        return [self]


class Shared:
    """One name for operators of different kinds (zero, random, learn grow depth or width): the change asked
    for picks the operator."""

    def __init__(self, *operators: Operator):
        self.name = operators[0].name
        self._operators = operators

    def variants(self) -> list[Operator]:
        return list(self._operators)
