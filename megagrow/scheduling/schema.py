"""A plan checked whole when it is loaded, before anything trains or is written.

Every problem is one PlanError naming its key path, e.g.
    stages[1].lr.schedul: unknown key; expected one of schedule, warmup_iters
Flag dicts (target, training, data, a stage's model and parallel) take Megatron-LM's flag names, checked
against the trainer's parser (its types and choices); stop rules against the stop-rule fields; growth
operators against the operator registry, including whether they turn the previous stage's shape into
this one (mixture: from a `pair` stage, two models side by side); shapes against each stage's tensor and
pipeline parallel sizes. What needs the machine (data and tokenizer files, the trainer's own validation of
each stage's flags, room in the launcher) is scheduling.preflight's, run by the driver before stage 0.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import fields

from megagrow.scheduling.timing import STOP_RULES, PlanError, StopRule

LR_SCHEDULES = ("continue", "rewarm", "constant")
TOP = {"target": dict, "budget": dict, "training": dict, "data": dict, "stages": list, "vocab_size": int}
STAGE = {"name": str, "model": dict, "grow": (dict, type(None)), "stop": dict, "lr": dict, "parallel": dict,
         "training": dict, "trainable": (str, list), "pair": (dict, type(None))}
LR = {"schedule": str, "warmup_iters": int}
BUDGET = {"flops": (int, float), "target_scratch_tokens": (int, float)}
GROW_OP = {"op": str}
GROW_SELECT = {"select": str, "k": int, "candidates": (list, type(None)), "space": (bool, str), "groups": int,
               "time_limit": (int, float, type(None)), "parallel": (dict, type(None))}
STOP_EXTRA = {"tokens": (int, float), "evidence": dict, "probe_iters": int}
PAIR = {"seeds": list, "data_path": list}
_NUMBER = (int, float)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # a stage's folder is stage<i>_<name>
# Flags that count something: 0 or less is a plan that cannot train, said at the plan's key.
_AT_LEAST_1 = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
               "kv_channels", "seq_length", "max_position_embeddings", "make_vocab_size_divisible_by",
               "micro_batch_size", "global_batch_size", "tensor_model_parallel_size", "pipeline_model_parallel_size",
               "log_interval", "eval_interval", "save_interval", "vocab_size")
# Flags `training` may not set: a stage's shape is the target's plus its `model`, its layout its `parallel`
# (seq_length is the one shape flag every stage shares; the backend and its timeout are the machine's).
_STAGE_GROUPS = ("model", "parallelism")
_SHARED = ("seq_length", "distributed_backend", "distributed_timeout_minutes")
# A plan's stages are counted in iterations by the driver: sample-counted run lengths cannot mix in.
_SAMPLE_COUNTED = ("train_samples", "lr_decay_samples", "lr_warmup_samples", "rampup_batch_size")


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
        if key in _AT_LEAST_1 and v is not None and v < 1:
            raise PlanError(f"{path}.{key}: must be at least 1, got {v!r}")


def _field_types(annotation: str) -> tuple:
    """A StopRule field's annotation ('int | None', 'float', 'dict') as the plan types it accepts."""
    names = {"int": (int,), "float": _NUMBER, "dict": (dict,), "str": (str,), "None": (type(None),)}
    return tuple(t for part in str(annotation).split("|") for t in names.get(part.strip(), _NUMBER + (str, dict)))


def _stop(stop: dict, path: str, last: bool, after: int) -> None:
    """`after`: the iteration the previous stage ends at when the plan fixes it (0 for the first stage)."""
    allowed = {**{f.name: _field_types(f.type) for f in fields(StopRule) if f.name != "start"},
               **STOP_EXTRA, "policy": str}
    _keys(stop, allowed, path, required=("policy",))
    if stop["policy"] not in STOP_RULES:
        raise PlanError(f"{path}.policy: unknown stop rule {stop['policy']!r}; expected one of "
                        f"{', '.join(STOP_RULES.names())}")
    for key, least in (("window", 2), ("patience", 1), ("probe_iters", 4), ("max_iteration", 1)):
        if stop.get(key) is not None and stop[key] < least:
            why = {"window": " (a slope needs two evaluations)",
                   "probe_iters": " (the loss law is fitted on at least 4 evaluations)"}.get(key, "")
            raise PlanError(f"{path}.{key}: must be at least {least}{why}, got {stop[key]!r}")
    for key in ("flops", "tokens", "flops_ratio", "threshold"):
        if stop.get(key) is not None and not stop[key] > 0:
            raise PlanError(f"{path}.{key}: must be positive, got {stop[key]!r}")
    for key in ("iteration", "max_iteration"):
        if stop.get(key) is not None and stop[key] <= after:
            raise PlanError(f"{path}.{key}: {stop[key]} is not after iteration {after}, where the stage starts "
                            "(iterations count on through the run)")
    if stop.get("law") is not None:
        law = stop["law"]
        if sorted(law) != ["a", "b", "c"] or not all(_is(law[k], _NUMBER) for k in law):
            raise PlanError(f"{path}.law: expected {{a: number, b: number, c: number}} (L(n) = a n^-b + c), "
                            f"got {law!r}")
        if not (law["a"] > 0 and law["b"] > 0):
            raise PlanError(f"{path}.law: a and b must be positive, got {law!r}")
    runtime = {"flops": 1.0, "flops_ratio": 1.0, "law": stop.get("law", {"a": 1, "b": 1, "c": 0}), "iteration": 0}
    fixed = {k: v for k, v in stop.items() if k not in ("probe_iters",)}
    try:
        StopRule.from_plan(fixed, 1, **{k: v for k, v in runtime.items() if k not in stop})
    except (TypeError, ValueError) as e:
        raise PlanError(f"{path}: {e}") from None
    if stop["policy"] == "ecr" and "law" not in stop and last:
        raise PlanError(f"{path}.policy: ecr needs a next stage to compare with")


def _divides(shape, parallel: dict, path: str) -> None:
    """What megatron-core needs of a shape split over the stage's TP x PP, on `nproc` processes."""
    tp, pp = parallel.get("tensor_model_parallel_size", 1), parallel.get("pipeline_model_parallel_size", 1)
    nproc = parallel.get("nproc", 1)
    if nproc < 1:
        raise PlanError(f"{path}.nproc: must be at least 1, got {nproc}")
    heads, groups = shape.num_attention_heads, shape.num_query_groups
    for what, size in (("num_attention_heads", heads), ("num_query_groups", groups),
                       ("ffn_hidden_size", shape.ffn_hidden_size)):
        if size % tp:
            raise PlanError(f"{path}.tensor_model_parallel_size: {tp} does not divide the stage's {what} {size}")
    if shape.num_layers % pp:
        raise PlanError(f"{path}.pipeline_model_parallel_size: {pp} does not divide the stage's "
                        f"{shape.num_layers} layers")
    if nproc % (tp * pp):
        raise PlanError(f"{path}.nproc: {nproc} processes are not a multiple of TP x PP = {tp * pp}")


def _shape(shape, where, explicit_kv: bool) -> None:
    """A shape megatron-core can build at all, before any split; `where(key)`: the key path that sets it."""
    heads, groups = shape.num_attention_heads, shape.num_query_groups
    if not explicit_kv and shape.hidden_size % heads:
        raise PlanError(f"{where('num_attention_heads')}: {heads} does not divide the stage's hidden_size "
                        f"{shape.hidden_size} (or give kv_channels)")
    if heads % groups:
        raise PlanError(f"{where('num_query_groups')}: {groups} does not divide the stage's num_attention_heads "
                        f"{heads}")


def _parallel(parallel: dict, path: str) -> None:
    _flags({k: v for k, v in parallel.items() if k != "nproc"}, _flag_table(("parallelism",)), path)
    if not _is(parallel.get("nproc", 1), int):
        raise PlanError(f"{path}.nproc: expected an integer, got {parallel['nproc']!r}")


def _grow(grow: dict, path: str, old, new) -> None:
    from megagrow.errors import MegagrowError
    from megagrow.growth.registry import check_growth
    if "select" in grow:
        _keys(grow, GROW_SELECT, path, required=("k",))
        if grow["select"] != "lag":
            raise PlanError(f"{path}.select: unknown selection {grow['select']!r}; expected lag")
        for key in ("k", "groups"):
            if grow.get(key, 1) < 1:
                raise PlanError(f"{path}.{key}: must be at least 1, got {grow[key]!r}")
        if grow.get("time_limit") is not None and not grow["time_limit"] > 0:
            raise PlanError(f"{path}.time_limit: must be positive (seconds), got {grow['time_limit']!r}")
        if grow.get("space", True) not in (True, False, "dup"):
            raise PlanError(f"{path}.space: expected true, false or dup, got {grow['space']!r}")
        specs = list(grow.get("candidates") or [])
        if not all(isinstance(spec, str) for spec in specs):
            raise PlanError(f"{path}.candidates: expected operator specs (strings), got {specs!r}")
        if not specs and not grow.get("space", True):
            raise PlanError(f"{path}: no candidates (give `space: true` or `candidates: [...]`)")
        if grow.get("space", not specs):
            from megagrow.lag.probe import design_space
            try:
                design_space(old.num_layers, new.num_layers)
            except MegagrowError as e:
                raise PlanError(f"{path}.space: {e}") from None
        where = [f"{path}.candidates[{i}]" for i in range(len(specs))]
        if grow.get("parallel") is not None:
            _parallel(grow["parallel"], f"{path}.parallel")
            _divides(new, grow["parallel"], f"{path}.parallel")
    else:
        _keys(grow, GROW_OP, path, required=("op",))
        specs, where = [grow["op"]], [f"{path}.op"]
    for spec, at in zip(specs, where):
        try:
            check_growth(spec, old, new)
        except MegagrowError as e:
            raise PlanError(f"{at}: {str(e).removeprefix(f'--op {spec}: ')}") from None


def _trainable(trainable, grow: dict | None, old, new, path: str) -> None:
    """`all`, `new` (the layers the depth growth into the stage makes) or a list of the stage's layers (1-based)."""
    if isinstance(trainable, list):
        for n in trainable:
            if not _is(n, int) or not 1 <= n <= new.num_layers:
                raise PlanError(f"{path}: {n!r} is not one of the stage's layers 1..{new.num_layers}")
        return
    if trainable not in ("all", "new"):
        raise PlanError(f"{path}: expected all, new or a list of layer numbers, got {trainable!r}")
    if trainable == "all":
        return
    if grow is None:
        why = "the first stage grows from nothing"
    elif "select" in grow:
        why = "LAG chooses the operator at run time: name one (grow: {op: ...}) or list the layers"
    else:
        from megagrow.growth.registry import plan_growth
        plan = plan_growth(grow["op"], old, new)
        if plan.new_layers() is not None:
            return
        why = f"{grow['op']} grows width" if plan.op.kind == "width" else f"{grow['op']} mixes old layers into every one"
    raise PlanError(f"{path}: new needs a depth growth into the stage that makes new layers ({why})")


def _pair(stage: dict, i: int, stages: list, path: str) -> None:
    """Two models side by side (scheduling.pair): the first stage, a fixed end, half the processes each, two
    different models, and the next stage grows them with mixture."""
    pair = stage["pair"]
    _keys(pair, PAIR, path)
    if i:
        raise PlanError(f"{path}: only the first stage trains two models (both from scratch)")
    nxt = normalized_grow(stages[i + 1].get("grow")) if i + 1 < len(stages) else None
    if not nxt or not str(nxt.get("op", "")).startswith("mixture"):
        raise PlanError(f"{path}: the next stage must grow the two models with mixture (grow: {{op: mixture}})")
    policy = stage.get("stop", {}).get("policy")
    if policy not in ("iters", "tokens", "formula"):
        raise PlanError(f"{path}: both models stop together at a fixed iteration: stop.policy must be iters, tokens "
                        f"or formula, not {policy}")
    parallel = stage.get("parallel", {"nproc": 1})
    tp = parallel.get("tensor_model_parallel_size", 1) * parallel.get("pipeline_model_parallel_size", 1)
    if parallel.get("nproc", 1) % (2 * tp):
        raise PlanError(f"{path}: each model trains on half of parallel.nproc {parallel.get('nproc', 1)}, which must "
                        f"be a multiple of TP x PP = {tp}")
    seeds = pair.get("seeds")
    if seeds is not None and (len(seeds) != 2 or not all(_is(x, int) for x in seeds)):
        raise PlanError(f"{path}.seeds: expected two integers, got {seeds!r}")
    data = pair.get("data_path")
    if data is not None and (len(data) != 2 or not all(_is(d, (str, list)) and d for d in data)):
        raise PlanError(f"{path}.data_path: expected two data paths (a prefix or a blend each), got {data!r}")
    if seeds is not None and seeds[0] == seeds[1] and not data:
        raise PlanError(f"{path}.seeds: the same seed and data twice train the same model twice")


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
    stage_only = _flag_table(_STAGE_GROUPS)

    def training_flags(flags: dict, path: str) -> None:
        _flags(flags, all_flags, path)
        for key in flags:
            if key == "freeze_layers":
                raise PlanError(f"{path}.{key}: a stage says which layers train with `trainable` (all, new or a list)")
            if key in _SAMPLE_COUNTED:
                raise PlanError(f"{path}.{key}: a plan counts iterations (the driver sets each stage's "
                                "--train-iters from the budget); use lr_warmup_iters or lr_warmup_fraction")
            if key in stage_only and key not in _SHARED:
                where = "target or a stage's model" if key in model_flags else "a stage's parallel"
                raise PlanError(f"{path}.{key}: set it in {where} (every stage's shape and layout come from there)")
    training_flags(raw["training"], "training")
    _flags(raw["data"], _flag_table(("data",)), "data")
    _keys(raw["budget"], BUDGET, "budget", required=("flops",))
    for key in BUDGET:
        if key in raw["budget"] and not raw["budget"][key] > 0:
            raise PlanError(f"budget.{key}: must be positive, got {raw['budget'][key]!r}")
    if raw["vocab_size"] < 1:
        raise PlanError(f"vocab_size: must be at least 1, got {raw['vocab_size']!r}")
    for key in ("global_batch_size", "seq_length", "micro_batch_size", "lr"):
        if key not in raw["training"]:
            raise PlanError(f"training.{key}: missing")
    if not raw["stages"]:
        raise PlanError("stages: the plan has no stages")
    previous, after, names = None, 0, set()
    for i, stage in enumerate(raw["stages"]):
        path = f"stages[{i}]"
        if not isinstance(stage, dict):
            raise PlanError(f"{path}: expected a mapping, got {stage!r}")
        _keys(stage, STAGE, path, required=("name",))
        if not _NAME.fullmatch(stage["name"]):
            raise PlanError(f"{path}.name: {stage['name']!r} is not a folder name (letters, digits, . _ -)")
        if stage["name"] in names:
            raise PlanError(f"{path}.name: {stage['name']!r} names an earlier stage too")
        names.add(stage["name"])
        model = stage.get("model", {})
        _flags(model, model_flags, f"{path}.model")
        training_flags(stage.get("training", {}), f"{path}.training")  # this stage's own optimizer flags...
        _keys(stage.get("lr", {}), LR, f"{path}.lr")
        if stage.get("lr", {}).get("schedule", "continue") not in LR_SCHEDULES:
            raise PlanError(f"{path}.lr.schedule: {stage['lr']['schedule']!r} is not one of {', '.join(LR_SCHEDULES)}")
        if stage.get("lr", {}).get("warmup_iters", 0) < 0:
            raise PlanError(f"{path}.lr.warmup_iters: must be at least 0, got {stage['lr']['warmup_iters']!r}")
        parallel = stage.get("parallel", {"nproc": 1})
        _parallel(parallel, f"{path}.parallel")
        stop = stage.get("stop", {"policy": "flops"})
        _stop(stop, f"{path}.stop", i == len(raw["stages"]) - 1, after)
        if stop.get("iteration") is not None and "iteration" in STOP_RULES.get(stop["policy"]).needs:
            after = stop["iteration"]  # a fixed end: the next stage starts there
        flags = {**raw["target"], **model}
        try:
            shape = ModelShape.from_flags(flags, seq_length=raw["training"]["seq_length"],
                                          vocab_size=raw["vocab_size"])
        except (TypeError, ValueError, ZeroDivisionError) as e:
            raise PlanError(f"{path}.model: {e}") from None
        _shape(shape, lambda key: f"{path}.model.{key}" if key in model else f"target.{key}",
               flags.get("kv_channels") is not None)
        _divides(shape, parallel, f"{path}.parallel")
        grow = normalized_grow(stage.get("grow"))
        if i and not grow:
            raise PlanError(f"{path}.grow: missing (every stage after the first grows from the one before)")
        if grow and not i:
            raise PlanError(f"{path}.grow: the first stage has nothing to grow from")
        if grow:
            _grow(grow, f"{path}.grow", previous, shape)
            if str(grow.get("op", "")).startswith("mixture") and not raw["stages"][i - 1].get("pair"):
                raise PlanError(f"{path}.grow.op: mixture recombines two models: the stage before needs `pair`")
        if stage.get("pair") is not None:
            _pair(stage, i, raw["stages"], f"{path}.pair")
        _trainable(stage.get("trainable", "all"), grow, previous, shape, f"{path}.trainable")
        previous = shape
    if raw["stages"][-1].get("stop", {"policy": "flops"})["policy"] != "flops":
        raise PlanError(f"stages[{len(raw['stages']) - 1}].stop.policy: the last stage must stop on the budget (flops)")
