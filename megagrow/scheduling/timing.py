"""When to leave a stage: growth-timing policies, each a pure function of the curve seen so far.

- `iters` / `tokens` / `formula`: a fixed end iteration (`formula`: G_stack's guideline, slides 004,
  log10(d) = 0.88 log10(N) + 163.27 / log10(C) - 5.74, d tokens for the small model, N target
  parameters, C FLOPs), decided when the plan is made.
- `flops`: until the run's FLOPs reach the budget (the last stage).
- `converge` (paper 002's convergence stage): leave once the least-squares slope of the validation
  loss over the last `window` evaluations stays under `threshold` (per iteration) for `patience`
  evaluations in a row.
- `ecr` (paper 002's effect conversion rate): with the large model's loss law L_t(n) = a n^-b + c
  (n its iterations), V = L_t^-1(L_s) is what the small model's progress is worth in large-model
  iterations, and E = dV/dN_s = slope_s / L_t'(V) (slope_s: least squares over the last `window`
  evaluations, V at their mean loss). Leave once E < F_s / F_t (FLOPs per iteration,
  small over large): a small step then buys less than its FLOPs would buy in the large model.
Every decision carries its evidence (slope, E, threshold, curve) for the run's log and report.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from megagrow.errors import MegagrowError
from megagrow.registry import Registry



class PlanError(MegagrowError):
    """A plan or policy that cannot work; printed as one line."""


def gstack_small_tokens(target_params: float, compute_flops: float) -> float:
    """Tokens d to train the small model for (slides 004), unclamped; fitted for 410M-3B and ~1e20-1.5e21 FLOPs."""
    if target_params <= 1 or compute_flops <= 10:
        raise PlanError(f"G_stack formula: N={target_params:g} parameters and C={compute_flops:g} FLOPs must be > 10")
    return 10 ** (0.88 * math.log10(target_params) + 163.27 / math.log10(compute_flops) - 5.74)


def slope(iterations, losses) -> float:
    """Least-squares slope of loss per iteration."""
    x, y = np.asarray(iterations, dtype=float), np.asarray(losses, dtype=float)
    if len(x) < 2 or np.ptp(x) == 0:
        return float("nan")
    return float(np.polyfit(x, y, 1)[0])


@dataclass
class LossLaw:
    """L(n) = a * n**-b + c over n training iterations (n >= 1)."""
    a: float
    b: float
    c: float

    def loss(self, n: float) -> float:
        return self.a * n ** -self.b + self.c

    def iterations_to(self, loss: float) -> float:
        """n with L(n) = loss; inf when the law never gets there, 1 when it starts below."""
        if loss <= self.c:
            return math.inf
        return max(((loss - self.c) / self.a) ** (-1.0 / self.b), 1.0)

    def derivative(self, n: float) -> float:
        return -self.a * self.b * n ** (-self.b - 1)


def fit_loss_law(iterations, losses) -> LossLaw:
    """Fit a power law with an offset to a loss curve (from an earlier stage or a short probe)."""
    from scipy.optimize import curve_fit
    x, y = np.asarray(iterations, dtype=float), np.asarray(losses, dtype=float)
    if len(x) < 4:
        raise PlanError(f"fitting a loss law needs at least 4 points, got {len(x)}")
    p0 = (max(y[0] - y[-1], 1e-3) * x[0] ** 0.5, 0.5, max(y[-1] - 0.1 * abs(y[-1]), 0.0))
    (a, b, c), _ = curve_fit(lambda n, a, b, c: a * n ** -b + c, x, y, p0=p0, maxfev=20000,
                             bounds=([0, 1e-3, 0], [np.inf, 5, np.inf]))
    return LossLaw(float(a), float(b), float(c))


@dataclass
class Decision:
    stop: bool
    reason: str
    evidence: dict = field(default_factory=dict)


class StopPolicy:
    """One stop rule: the StopRule fields it needs, and its decisions (None/no stop by default).
    A new rule is a subclass here and one STOP_RULES.register line."""
    needs: tuple[str, ...] = ()

    def after_step(self, rule: "StopRule", iteration: int, flops_so_far: float, next_step_flops: float):
        return None

    def after_evaluation(self, rule: "StopRule", points: list[tuple[int, float]]) -> Decision:
        return Decision(False, "")


class FixedEnd(StopPolicy):
    needs = ("iteration",)

    def after_step(self, rule, iteration, flops_so_far, next_step_flops):
        if iteration >= rule.iteration:
            return Decision(True, f"{rule.policy}: reached iteration {rule.iteration}", {"iteration": iteration})


class Budget(StopPolicy):
    needs = ("flops",)

    def after_step(self, rule, iteration, flops_so_far, next_step_flops):
        if flops_so_far + next_step_flops > rule.flops:
            return Decision(True, f"flops: the next iteration would pass the budget of {rule.flops:.4g}",
                            {"flops": flops_so_far, "budget": rule.flops})


class Converge(StopPolicy):
    def after_evaluation(self, rule, points):
        return converge(points, rule.threshold, rule.window, rule.patience)


class EffectConversion(StopPolicy):
    needs = ("law", "flops_ratio")

    def after_evaluation(self, rule, points):
        return effect_conversion(points, LossLaw(**rule.law), rule.flops_ratio, rule.window)


STOP_RULES: Registry[StopPolicy] = Registry("growth-timing policy", PlanError)
for _name in ("iters", "tokens", "formula"):  # a fixed end iteration, decided when the plan is made
    STOP_RULES.register(_name, FixedEnd())
STOP_RULES.register("flops", Budget())
STOP_RULES.register("converge", Converge())
STOP_RULES.register("ecr", EffectConversion())
_MISSING = {"iteration": "the end iteration is missing", "flops": "the budget is missing",
            "law": "needs the large model's loss law {a, b, c} and flops_ratio F_s/F_t"}


@dataclass
class StopRule:
    """A stage's exit rule as the trainer applies it; `start` is the iteration the stage began at."""
    policy: str
    start: int = 0
    iteration: int | None = None      # iters/tokens/formula: the end iteration
    flops: float | None = None        # flops: the run's budget
    threshold: float = 3e-6           # converge: |slope| per iteration
    window: int = 5                   # converge/ecr: evaluations in the slope
    patience: int = 3                 # converge: evaluations in a row under the threshold
    law: dict | None = None           # ecr: {a, b, c} of the large model's loss law
    flops_ratio: float | None = None  # ecr: F_s / F_t
    max_iteration: int | None = None  # converge/ecr: leave here at the latest
    options: dict = field(default_factory=dict)  # a registered rule's own settings

    def __post_init__(self):
        rule = STOP_RULES.get(self.policy)
        for name in rule.needs:
            value = getattr(self, name)
            if value is None or (name != "iteration" and not value):  # iteration 0 is an end; a budget 0 is not
                raise PlanError(f"policy {self.policy}: {_MISSING.get(name, name + ' is missing')}")

    @classmethod
    def from_plan(cls, stop: dict, tokens_per_iteration: int | None = None, **fields) -> "StopRule":
        """From a plan's `stop:` entry plus run-time fields (`start`, budget, ...). `evidence` is a note for
        people; `tokens` (policy tokens) becomes the end iteration, counted from the stage's start."""
        values = {k: v for k, v in {**stop, **fields}.items() if k not in ("tokens", "evidence")}
        if stop.get("policy") == "tokens" and "iteration" not in stop and tokens_per_iteration:
            values["iteration"] = values.get("start", 0) + math.ceil(stop["tokens"] / tokens_per_iteration)
        return cls(**values)

    def as_dict(self) -> dict:
        """The rule as the trainer's --stage-stop JSON."""
        return dict(vars(self))

    def after_step(self, iteration: int, flops_so_far: float, next_step_flops: float) -> Decision:
        """Rules that need no evaluation: checked after every iteration."""
        decision = STOP_RULES.get(self.policy).after_step(self, iteration, flops_so_far, next_step_flops)
        if decision is not None:
            return decision
        if self.max_iteration is not None and iteration >= self.max_iteration:
            return Decision(True, f"{self.policy}: reached the stage's last iteration {self.max_iteration}",
                            {"iteration": iteration})
        return Decision(False, "")

    def after_evaluation(self, curve: list) -> Decision:
        """Curve-based rules, given every (iteration, validation loss, ...) of the run so far."""
        points = [(p[0], p[1]) for p in curve if p[0] > self.start]
        return STOP_RULES.get(self.policy).after_evaluation(self, points)


def converge(points: list[tuple[int, float]], threshold: float, window: int, patience: int) -> Decision:
    slopes = [slope(*zip(*points[k + 1 - window:k + 1])) for k in range(window - 1, len(points))]
    run = 0
    for s in reversed(slopes):
        if not abs(s) < threshold:
            break
        run += 1
    evidence = {"slopes": slopes[-patience:], "threshold": threshold, "window": window, "patience": patience,
                "curve": points}
    if run >= patience:
        return Decision(True, f"converge: |slope| {abs(slopes[-1]):.3g} < {threshold:g} for {run} evaluations",
                        evidence)
    return Decision(False, "", evidence)


def effect_conversion(points: list[tuple[int, float]], law: LossLaw, flops_ratio: float, window: int) -> Decision:
    if len(points) < window:
        return Decision(False, "", {"curve": points})
    recent = points[-window:]
    s_small = slope(*zip(*recent))
    v = law.iterations_to(float(np.mean([loss for _, loss in recent])))  # where the chord's slope holds
    if math.isinf(v):
        rate = math.inf  # the large model never reaches this loss: the small model is still worth it
    else:
        rate = s_small / law.derivative(v)
    evidence = {"E": rate, "threshold": flops_ratio, "slope_small": s_small, "V": v,
                "law": {"a": law.a, "b": law.b, "c": law.c}, "curve": points}
    if rate < flops_ratio:
        return Decision(True, f"ecr: E = {rate:.4g} < F_s/F_t = {flops_ratio:.4g}", evidence)
    return Decision(False, "", evidence)
