"""A staged run as a YAML file a person can read and edit, and `megagrow plan` that writes one.

    target:   the final model, in Megatron-LM flags (num_layers: 24, hidden_size: 2048, swiglu: true, ...)
    budget:   {flops: ...} the whole run's FLOPs (Megatron-LM's per-iteration formula), and the tokens
              a scratch run of the target would see with them
    training: flags every stage shares (global_batch_size, seq_length, lr, ..., eval_interval)
    data:     data_path, tokenizer_type, tokenizer_model, split, ...
    stages:   in order; each has `model` (flags that differ from the target), `grow` (the operator
              into this stage: {op: stack:g=4}), `stop` (a timing policy, scheduling.timing),
              `lr` ({schedule: continue | rewarm | constant, warmup_iters}), `parallel`
              ({tensor_model_parallel_size, pipeline_model_parallel_size, nproc}) and `trainable` (all, new:
              the layers the growth into it made, or a list of 1-based layers; the others are frozen);
              the first stage may train two models side by side (`pair`, scheduling.pair) for the next
              stage's `grow: {op: mixture}`: both models' FLOPs count against the budget.
The global batch and sequence length are shared so that samples, data order and the LR schedule
carry across stages; iteration numbers continue through the run.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
from dataclasses import dataclass, field

import yaml

from megagrow.scheduling.schema import check_plan, normalized_grow
from megagrow.scheduling.timing import PlanError, gstack_small_tokens
from megagrow.model.shape import ModelShape



@dataclass
class Stage:
    name: str
    model: dict = field(default_factory=dict)
    grow: dict | None = None
    stop: dict = field(default_factory=lambda: {"policy": "flops"})
    lr: dict = field(default_factory=lambda: {"schedule": "continue"})
    parallel: dict = field(default_factory=lambda: {"nproc": 1})
    training: dict = field(default_factory=dict)  # trainer flags of this stage only, over the plan's `training`
    trainable: str | list = "all"  # all | new | [1-based layers]: the others train frozen (--freeze-layers)
    pair: dict | None = None  # two models side by side (scheduling.pair): {seeds: [a, b], data_path: [A, B]}

    def __post_init__(self):
        self.grow = normalized_grow(self.grow)


@dataclass
class Plan:
    target: dict
    budget: dict
    training: dict
    data: dict
    stages: list[Stage]
    vocab_size: int  # the tokenizer's, for FLOPs and parameter counts before any model exists

    def model_args(self, stage: Stage | None = None) -> argparse.Namespace:
        """The stage's (or the target's) model as the trainer's args, with Megatron-LM's derived values."""
        return self.shape(stage).as_args()

    def shape(self, stage: Stage | None = None) -> ModelShape:
        """The stage's (or the target's) model shape, with Megatron-LM's defaults."""
        return ModelShape.from_flags({**self.target, **(stage.model if stage else {})},
                                     seq_length=self.training["seq_length"], vocab_size=self.vocab_size)

    def parameters(self, stage: Stage | None = None) -> int:
        return self.shape(stage).parameters()

    def step_flops(self, stage: Stage | None = None) -> float:
        return self.shape(stage).flops(self.training["global_batch_size"])

    def stage_step_flops(self, stage: Stage) -> float:
        """What one iteration of the stage costs the budget: both models' for a pair stage."""
        return self.step_flops(stage) * (2 if stage.pair else 1)

    @property
    def tokens_per_iteration(self) -> int:
        return self.training["global_batch_size"] * self.training["seq_length"]

    def max_iterations(self) -> int:
        """An upper bound on the run's iterations (all FLOPs in the cheapest stage): sizes the dataset."""
        return math.ceil(self.budget["flops"] / min(self.step_flops(s) for s in self.stages))

    def planned_iterations(self) -> list[int]:
        """Iterations per stage if every fixed end holds (dynamic ends: their max_iteration or formula guess)."""
        out, flops = [], 0.0
        for i, stage in enumerate(self.stages):
            end = stage.stop.get("iteration") or stage.stop.get("max_iteration")
            start = sum(out)
            if end is None or i == len(self.stages) - 1:
                end = start + int((self.budget["flops"] - flops) // self.stage_step_flops(stage))
            out.append(max(end - start, 0))
            flops += out[-1] * self.stage_step_flops(stage)
        return out

    def frozen_layers(self, stage: Stage) -> list[int]:
        """The layers (1-based) `stage` keeps as they are: those its `trainable` leaves out."""
        if stage.trainable == "all":
            return []
        trainable = stage.trainable
        if trainable == "new":  # the schema checked that a depth growth into the stage tells them
            from megagrow.growth.registry import plan_growth
            before = self.stages[self.stages.index(stage) - 1]
            trainable = plan_growth(stage.grow["op"], self.shape(before), self.shape(stage)).new_layers()
        return [n for n in range(1, self.shape(stage).num_layers + 1) if n not in trainable]

    def check(self) -> None:
        """The schema's checks (scheduling.schema), and that the last stage is the target."""
        check_plan(yaml.safe_load(dump_plan(self)))
        last = self.model_args(self.stages[-1])
        for key, value in self.target.items():
            if getattr(last, key, value) != value:
                raise PlanError(f"stages[{len(self.stages) - 1}].model.{key}: the last stage's {key} "
                                f"({getattr(last, key)}) is not the target's ({value})")


def load_plan(path: str) -> Plan:
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except OSError as e:
        raise PlanError(f"cannot read the plan {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise PlanError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    check_plan(raw)
    try:
        raw["stages"] = [Stage(**s) for s in raw["stages"]]
        plan = Plan(**raw)
    except (TypeError, KeyError) as e:
        raise PlanError(f"{path}: not a megagrow plan ({e})") from None
    plan.check()
    return plan


def dump_plan(plan: Plan) -> str:
    raw = copy.deepcopy({k: v for k, v in vars(plan).items() if k != "stages"})
    raw["stages"] = [{k: v for k, v in vars(s).items() if (k, v) not in (("training", {}), ("trainable", "all"),
                                                                         ("pair", None))}
                     for s in plan.stages]
    return yaml.safe_dump(raw, sort_keys=False, default_flow_style=None, width=110)


def make_plan(target: dict, vocab_size: int, training: dict, data: dict, *, flops: float | None = None,
              tokens: float | None = None, growth_factor: int = 4, stages: int = 2, op: str = "stack",
              policy: str = "formula", max_small_fraction: float = 0.25, parallel: dict | None = None,
              policy_options: dict | None = None, lag_k: int | None = None, lag_groups: int = 1) -> Plan:
    """A G_stack plan: the small model(s) at L/g layers, grown `stages - 1` times into the target."""
    L = target["num_layers"]
    if not 2 <= growth_factor <= 4:
        print(f"warning: growth factor g={growth_factor} is outside 2..4, the range the G_stack guideline "
              "recommends", file=sys.stderr)
    if growth_factor < 2 or L % growth_factor:
        raise PlanError(f"growth factor {growth_factor} must be >= 2 and divide the target's {L} layers")
    if stages < 2:
        raise PlanError("a staged plan needs at least 2 stages")
    small = L // growth_factor
    if stages == 2:
        depths = [small, L]
    else:  # gradual: +k layers per hop (Reddi et al.), the last hop may be shorter
        step = math.ceil((L - small) / (stages - 1))
        depths = [min(small + i * step, L) for i in range(stages)]
        if len(set(depths)) != stages:
            raise PlanError(f"{stages} stages cannot each add layers between {small} and {L}")
    parallel = parallel or {"nproc": 1}
    plan = Plan(target=dict(target), budget={}, training=dict(training), data=dict(data), stages=[],
                vocab_size=vocab_size)
    per_iter = plan.tokens_per_iteration
    if flops is None:
        if tokens is None:
            raise PlanError("give the budget as --train-tokens or --budget-flops")
        flops = math.ceil(tokens / per_iter) * plan.step_flops()
    plan.budget = {"flops": float(flops), "target_scratch_tokens": int(flops / plan.step_flops() * per_iter)}
    scratch_tokens = plan.budget["target_scratch_tokens"]
    start = 0
    for i, depth in enumerate(depths):
        stage = Stage(name=f"{depth}l", model={"num_layers": depth} if depth != L else {},
                      parallel=dict(parallel))
        if i:
            prev = depths[i - 1]
            stage.grow = {"op": f"stack:g={depth // prev}" if op == "stack" and depth % prev == 0 else "lag:last"}
            if lag_k:  # choose the operator by LAG@k: the duplication design space, or stack vs interpolate
                fits = depth - prev <= prev
                stage.grow = {"select": "lag", "k": lag_k, "space": "dup" if fits else False, "groups": lag_groups,
                              "candidates": [] if fits else [stage.grow["op"], f"interpolate:g={depth // prev}"]
                              if depth % prev == 0 else ["lag:last"]}
            stage.lr = {"schedule": "continue"}
        if i == len(depths) - 1:
            stage.stop = {"policy": "flops"}
        else:
            # G_stack's guideline for the tokens before growing into the next model (C = 6 N D, per the paper).
            n_next = plan.parameters(Stage("next", model={"num_layers": depths[i + 1]}))
            d = gstack_small_tokens(n_next, 6 * n_next * scratch_tokens)
            limit = max_small_fraction * scratch_tokens
            evidence = {"formula_tokens": d, "N": n_next, "C": 6 * n_next * scratch_tokens}
            if d > limit:
                print(f"warning: the G_stack formula gives d = {d:.3g} tokens for stage {i}, more than "
                      f"{max_small_fraction:g} of the budget's {scratch_tokens:.3g}; it was fitted on 410M-3B "
                      f"models and 1e20-1.5e21 FLOPs. Clamped to {limit:.3g}.", file=sys.stderr)
                d = limit
            end = start + max(1, round(d / per_iter))
            stage.stop = {"policy": "formula", "iteration": end, "tokens": (end - start) * per_iter,
                          "evidence": evidence}
            if policy in ("converge", "ecr"):
                stage.stop = {"policy": policy, "max_iteration": end, **(policy_options or {})}
            elif policy in ("iters", "tokens"):
                stage.stop = {"policy": policy, "iteration": end, **(policy_options or {})}
            start = end
        plan.stages.append(stage)
    plan.check()
    return plan


def describe(plan: Plan) -> str:
    """The plan with its FLOPs accounting, one line per stage."""
    rows = [f"target: {plan.target['num_layers']} layers, hidden {plan.target['hidden_size']}, "
            f"{plan.parameters() / 1e6:.2f}M parameters; budget {plan.budget['flops']:.4g} FLOPs "
            f"(= {plan.budget['target_scratch_tokens']:.4g} tokens of the target from scratch)",
            f"{'stage':<14} {'layers':>6} {'params':>10} {'FLOPs/iter':>11} {'iters':>8} {'tokens':>10} "
            f"{'FLOPs':>10} {'share':>6}  stop / grow"]
    for stage, iters in zip(plan.stages, plan.planned_iterations()):
        a, f = plan.model_args(stage), plan.stage_step_flops(stage)
        grow = stage.grow or {}
        how = stage.stop["policy"] + (f" <- LAG@{grow['k']}" if "select" in grow else
                                      f" <- {grow['op']}" if grow else "") + (" (two models)" if stage.pair else "")
        rows.append(f"{stage.name:<14} {a.num_layers:>6} {plan.parameters(stage) / 1e6:>9.2f}M {f:>11.4g} "
                    f"{iters:>8} {iters * plan.tokens_per_iteration:>10.4g} {iters * f:>10.4g} "
                    f"{iters * f / plan.budget['flops']:>6.1%}  {how}")
    return "\n".join(rows)
