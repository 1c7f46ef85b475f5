"""A plan checked whole when it is loaded, before anything trains or is written.

Every problem is one PlanError naming its key path, e.g.
    stages[1].lr.schedul: unknown key; expected one of schedule, warmup_iters
Flag dicts (target, training, data, a stage's model and parallel) take Megatron-LM's flag names, checked
against the trainer's parser (its types and choices); stop rules against the stop-rule fields; growth
operators against the operator registry, including whether they turn the previous stage's shape into
this one; shapes against each stage's tensor and pipeline parallel sizes.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import fields

from megagrow.scheduling.timing import STOP_RULES, PlanError, StopRule

LR_SCHEDULES = ("continue", "rewarm", "constant")
TOP = {"target": dict, "budget": dict, "training": dict, "data": dict, "stages": list, "vocab_size": int}
STAGE = {"name": str, "model": dict, "grow": (dict, type(None)), "stop": dict, "lr": dict, "parallel": dict}
LR = {"schedule": str, "warmup_iters": int}
BUDGET = {"flops": (int, float), "target_scratch_tokens": (int, float)}
GROW_OP = {"op": str}
GROW_SELECT = {"select": str, "k": int, "candidates": (list, type(None)), "space": (bool, str), "groups": int,
               "time_limit": (int, float, type(None)), "parallel": (dict, type(None))}
STOP_EXTRA = {"tokens": (int, float), "evidence": dict, "probe_iters": int}
_NUMBER = (int, float)


def _type_name(t) -> str:
    names = {dict: "a mapping", list: "a list", str: "a string", int: "an integer", float: "a number",
             bool: "true or false", type(None): "null"}
    return " or ".join(names[x] for x in (t if isinstance(t, tuple) else (t,)))


def _is(value, t) -> bool:
    types = t if isinstance(t, tuple) else (t,)
    if isinstance(value, bool) and bool not in types:
        return False  # YAML's true is not an integer here
    return isinstance(value, types)


def _keys(value: dict, allowed: dict, path: str, required: tuple = ()) -> None:
    at = f"{path}." if path else ""
    for key, v in value.items():
        if key not in allowed:
            raise PlanError(f"{at}{key}: unknown key; expected one of {', '.join(allowed)}")
        if not _is(v, allowed[key]):
            raise PlanError(f"{at}{key}: expected {_type_name(allowed[key])}, got {v!r}")
    for key in required:
        if key not in value:
            raise PlanError(f"{at}{key}: missing")


def _flag_table(groups: tuple[str, ...] | None) -> dict[str, argparse.Action]:
    from megagrow.training.arguments import build_parser
    from megagrow.training.flags import flag_key
    table = {}
    for group in build_parser()._action_groups:
        if groups is None or group.title in groups:
            table.update({flag_key(a): a for a in group._group_actions if a.option_strings})
    return table


def _flags(value: dict, table: dict[str, argparse.Action], path: str) -> None:
    for key, v in value.items():
        action = table.get(key)
        if action is None:
            raise PlanError(f"{path}.{key}: not a Megatron-LM flag megagrow knows (--{key.replace('_', '-')})")
        switch = isinstance(action.const, bool) and action.nargs == 0
        want = bool if switch else (list, str) if action.nargs in ("+", "*") else {int: int, float: _NUMBER}.get(
            action.type, (str, int, float))
        if not _is(v, want) and not (v is None and not switch):
            raise PlanError(f"{path}.{key}: expected {_type_name(want)}, got {v!r}")
        if action.choices and v is not None and v not in action.choices:
            raise PlanError(f"{path}.{key}: {v!r} is not one of {', '.join(map(str, action.choices))}")


def _stop(stop: dict, path: str, last: bool) -> None:
    allowed = {**{f.name: (int, float, dict, str, type(None)) for f in fields(StopRule) if f.name != "start"},
               **STOP_EXTRA, "policy": str}
    _keys(stop, allowed, path, required=("policy",))
    if stop["policy"] not in STOP_RULES:
        raise PlanError(f"{path}.policy: unknown stop rule {stop['policy']!r}; expected one of "
                        f"{', '.join(STOP_RULES.names())}")
    runtime = {"flops": 1.0, "flops_ratio": 1.0, "law": stop.get("law", {"a": 1, "b": 1, "c": 0}), "iteration": 0}
    fixed = {k: v for k, v in stop.items() if k not in ("probe_iters",)}
    try:
        StopRule.from_plan(fixed, 1, **{k: v for k, v in runtime.items() if k not in stop})
    except (TypeError, ValueError) as e:
        raise PlanError(f"{path}: {e}") from None
    if stop["policy"] == "ecr" and "law" not in stop and last:
        raise PlanError(f"{path}.policy: ecr needs a next stage to compare with")


def _divides(shape, parallel: dict, path: str) -> None:
    tp, pp = parallel.get("tensor_model_parallel_size", 1), parallel.get("pipeline_model_parallel_size", 1)
    for what, size in (("num_attention_heads", shape.num_attention_heads), ("num_query_groups", shape.num_query_groups),
                       ("ffn_hidden_size", shape.ffn_hidden_size)):
        if size % tp:
            raise PlanError(f"{path}.tensor_model_parallel_size: {tp} does not divide the stage's {what} {size}")
    if shape.num_layers % pp:
        raise PlanError(f"{path}.pipeline_model_parallel_size: {pp} does not divide the stage's "
                        f"{shape.num_layers} layers")
    nproc = parallel.get("nproc", 1)
    if nproc % (tp * pp):
        raise PlanError(f"{path}.nproc: {nproc} processes are not a multiple of TP x PP = {tp * pp}")


def _grow(grow: dict, path: str, old, new) -> None:
    from megagrow.errors import MegagrowError
    from megagrow.growth.registry import check_growth
    if "select" in grow:
        _keys(grow, GROW_SELECT, path, required=("k",))
        if grow["select"] != "lag":
            raise PlanError(f"{path}.select: unknown selection {grow['select']!r}; expected lag")
        specs = list(grow.get("candidates") or [])
        if not specs and not grow.get("space", True):
            raise PlanError(f"{path}: no candidates (give `space: true` or `candidates: [...]`)")
        where = [f"{path}.candidates[{i}]" for i in range(len(specs))]
    else:
        _keys(grow, GROW_OP, path, required=("op",))
        specs, where = [grow["op"]], [f"{path}.op"]
    for spec, at in zip(specs, where):
        try:
            check_growth(spec, old, new)
        except MegagrowError as e:
            raise PlanError(f"{at}: {str(e).removeprefix(f'--op {spec}: ')}") from None


def normalized_grow(grow: dict | None) -> dict | None:
    """A stage's `grow` entry in today's form: `{op: SPEC}`, or a LAG selection `{select: lag, k: K, ...}`
    (the older `{op: "lag:k=K", ...}` is still read)."""
    if not grow or "select" in grow:
        return grow
    m = re.fullmatch(r"lag:k=(\d+)", str(grow.get("op", "")).strip())
    if not m:
        return grow
    return {"select": "lag", "k": int(m.group(1)), **{k: v for k, v in grow.items() if k != "op"}}


def check_plan(raw) -> None:
    """Raise one PlanError naming the first problem's key path; return when the plan can run."""
    from megagrow.model.shape import ModelShape
    if not isinstance(raw, dict):
        raise PlanError("the plan is not a mapping of target, budget, training, data, stages")
    _keys(raw, TOP, "", required=tuple(TOP))
    model_flags, all_flags = _flag_table(("model",)), _flag_table(None)
    _flags(raw["target"], model_flags, "target")
    _flags(raw["training"], all_flags, "training")
    _flags(raw["data"], _flag_table(("data",)), "data")
    _keys(raw["budget"], BUDGET, "budget", required=("flops",))
    for key in ("global_batch_size", "seq_length", "micro_batch_size", "lr"):
        if key not in raw["training"]:
            raise PlanError(f"training.{key}: missing")
    if not raw["stages"]:
        raise PlanError("stages: the plan has no stages")
    previous = None
    for i, stage in enumerate(raw["stages"]):
        path = f"stages[{i}]"
        if not isinstance(stage, dict):
            raise PlanError(f"{path}: expected a mapping, got {stage!r}")
        _keys(stage, STAGE, path, required=("name",))
        _flags(stage.get("model", {}), model_flags, f"{path}.model")
        _keys(stage.get("lr", {}), LR, f"{path}.lr")
        if stage.get("lr", {}).get("schedule", "continue") not in LR_SCHEDULES:
            raise PlanError(f"{path}.lr.schedule: {stage['lr']['schedule']!r} is not one of {', '.join(LR_SCHEDULES)}")
        parallel = stage.get("parallel", {"nproc": 1})
        _flags({k: v for k, v in parallel.items() if k != "nproc"}, _flag_table(("parallelism",)), f"{path}.parallel")
        if not _is(parallel.get("nproc", 1), int):
            raise PlanError(f"{path}.parallel.nproc: expected an integer, got {parallel['nproc']!r}")
        _stop(stage.get("stop", {"policy": "flops"}), f"{path}.stop", i == len(raw["stages"]) - 1)
        try:
            shape = ModelShape.from_flags({**raw["target"], **stage.get("model", {})},
                                          seq_length=raw["training"]["seq_length"], vocab_size=raw["vocab_size"])
        except (TypeError, ValueError, ZeroDivisionError) as e:
            raise PlanError(f"{path}.model: {e}") from None
        _divides(shape, parallel, f"{path}.parallel")
        grow = normalized_grow(stage.get("grow"))
        if i and not grow:
            raise PlanError(f"{path}.grow: missing (every stage after the first grows from the one before)")
        if grow and not i:
            raise PlanError(f"{path}.grow: the first stage has nothing to grow from")
        if grow:
            _grow(grow, f"{path}.grow", previous, shape)
        previous = shape
    if raw["stages"][-1].get("stop", {"policy": "flops"})["policy"] != "flops":
        raise PlanError(f"stages[{len(raw['stages']) - 1}].stop.policy: the last stage must stop on the budget (flops)")
