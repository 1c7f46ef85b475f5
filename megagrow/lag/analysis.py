"""How well does a LAG probe's loss at step t predict the final loss? (paper 000, sections 3.3 and 4)

Candidates are the growth operators probed; each has a validation curve after growing. With
`losses[i, t]` candidate i's loss at the t-th common step and `finals[i]` its final loss (after full
training when known, else its loss at the last common probe step):
- correlation with final: Pearson and Spearman across candidates of losses[:, t] vs finals;
- self-correlation: Spearman across candidates of losses[:, t] vs losses[:, t'] for every pair (t, t');
- recall@k(t): 1 if the final best candidate (argmin finals) is among the k lowest at step t, else 0;
- regret(t) = finals[argmin losses[:, t]] - min finals; relative regret = regret / (max - min finals),
  0 when every final is equal;
- settling step: the first evaluated step t such that at t and every later step the candidate chosen
  (argmin of the loss there) is a final best (zero regret); None if the last step's choice is not.
Ties: argmin takes the first candidate; recall counts only candidates strictly lower than the best.
Correlations with a constant (or non-finite) input are NaN, silently.
"""

from __future__ import annotations

import json
import math
import os
import warnings

import numpy as np
from scipy import stats

from megagrow.errors import MegagrowError
from megagrow.runs.directory import lag_dirs, probe_results

Curves = dict[str, list[tuple[int, float]]]


def load_probe_results(lag_dir: str) -> tuple[Curves, dict[str, float] | None]:
    """Curves of every `lag_dir/*/result.json` with status done (failed probes are left out), keyed
    by spec, and their final losses when every done probe has one (else None)."""
    if not os.path.isdir(lag_dir):
        raise FileNotFoundError(f"no LAG directory {lag_dir}")
    curves: Curves = {}
    finals: dict[str, float | None] = {}
    for r in probe_results(lag_dir):
        if r.get("status") != "done":
            continue
        curves[r["spec"]] = [(int(it), float(loss)) for it, loss in r["curve"]]
        finals[r["spec"]] = None if r.get("final_loss") is None else float(r["final_loss"])
    complete = bool(finals) and all(v is not None for v in finals.values())
    return curves, (finals if complete else None)  # type: ignore[return-value]


def align(curves: Curves) -> tuple[np.ndarray, list[str], np.ndarray]:
    """(steps every candidate has, sorted; specs; losses [n_candidates, n_steps]). A step logged twice
    (a resumed probe) keeps its last value."""
    specs = list(curves)
    per = [dict(curves[s]) for s in specs]
    common = sorted(set.intersection(*(set(d) for d in per))) if per else []
    losses = np.array([[d[t] for t in common] for d in per], dtype=float).reshape(len(specs), len(common))
    return np.array(common, dtype=int), specs, losses


def _corr(fn, a: np.ndarray, b: np.ndarray) -> float:
    # Constant or non-finite inputs have no defined correlation: NaN without scipy's warning.
    if not (np.isfinite(a).all() and np.isfinite(b).all()) or np.ptp(a) == 0 or np.ptp(b) == 0:
        return math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(fn(a, b)[0])


def correlations_with_final(losses: np.ndarray, finals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pearson and Spearman (scipy.stats) across candidates of losses[:, t] vs finals, per step t."""
    finals = np.asarray(finals, dtype=float)
    pearson = np.array([_corr(stats.pearsonr, col, finals) for col in losses.T])
    spearman = np.array([_corr(stats.spearmanr, col, finals) for col in losses.T])
    return pearson, spearman


def self_correlation(losses: np.ndarray) -> np.ndarray:
    """[n_steps, n_steps] Spearman correlation across candidates between every pair of steps."""
    # Spearman = Pearson of average ranks; done on all columns at once (probes may log many steps).
    bad = ~np.isfinite(losses).all(axis=0)
    ranks = stats.rankdata(np.where(np.isfinite(losses), losses, 0.0), axis=0)
    z = ranks - ranks.mean(axis=0)
    norm = np.sqrt((z * z).sum(axis=0))
    with np.errstate(divide="ignore", invalid="ignore"):
        c = (z.T @ z) / np.outer(norm, norm)
    c[:, (norm == 0) | bad] = np.nan
    c[(norm == 0) | bad, :] = np.nan
    ok = ~((norm == 0) | bad)
    c[ok, ok] = 1.0  # exact, not 1 - 1e-16
    return np.clip(c, -1.0, 1.0)


def _chosen(losses: np.ndarray) -> np.ndarray:
    # A diverged probe (NaN/inf) is never the one to choose.
    return np.argmin(np.where(np.isfinite(losses), losses, np.inf), axis=0)


def recall_at_k(losses: np.ndarray, finals: np.ndarray, k: int) -> np.ndarray:
    """[n_steps] 1 where the final best is among the k lowest losses at the step (fewer than k
    candidates strictly below it), else 0."""
    best = int(np.argmin(finals))
    x = np.where(np.isfinite(losses), losses, np.inf)
    return ((x < x[best]).sum(axis=0) < k).astype(int)


def regret(losses: np.ndarray, finals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(regret, relative regret) per step of choosing argmin losses[:, t]."""
    finals = np.asarray(finals, dtype=float)
    r = finals[_chosen(losses)] - finals.min()
    spread = finals.max() - finals.min()
    return r, (r / spread if spread > 0 else np.zeros_like(r))


def settling_step(steps: np.ndarray, losses: np.ndarray, finals: np.ndarray) -> int | None:
    """First step from which every step's choice (itself included) has zero regret; None if never."""
    ok = regret(losses, finals)[0] == 0
    bad = np.flatnonzero(~ok)
    first = 0 if bad.size == 0 else int(bad[-1]) + 1
    return int(steps[first]) if first < len(steps) else None


def _json_safe(a) -> list:
    return [None if isinstance(v, float) and not math.isfinite(v) else v for v in np.asarray(a).tolist()]


def _plots(out_dir: str, s: dict, curves: Curves, self_corr: np.ndarray) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = s["steps"]

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, name), dpi=110)
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for key in ("pearson", "spearman"):
        ax.plot(steps, [math.nan if v is None else v for v in s[key]], marker="o", ms=3, label=key.capitalize())
    ax.set(xlabel="step after growth", ylabel="correlation with final loss", ylim=(-1.05, 1.05))
    ax.axhline(0, color="grey", lw=0.5)
    ax.legend()
    save(fig, "correlation_vs_step.png")

    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    im = ax.imshow(np.ma.masked_invalid(self_corr), cmap="RdBu_r", vmin=-1, vmax=1, origin="lower")
    ticks = np.unique(np.linspace(0, len(steps) - 1, min(len(steps), 8)).round().astype(int))
    ax.set_xticks(ticks, [steps[i] for i in ticks], rotation=45)
    ax.set_yticks(ticks, [steps[i] for i in ticks])
    ax.set(xlabel="step", ylabel="step", title="Spearman correlation of losses")
    fig.colorbar(im, ax=ax)
    save(fig, "self_correlation.png")

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for j, (k, rec) in enumerate(s["recall_at_k"].items()):
        ax.step(steps, np.array(rec) + 0.02 * j, where="mid", marker="o", ms=3, label=f"recall@{k}")  # offset: lines overlap
    ax.set(xlabel="step after growth", ylabel="recall", ylim=(-0.1, 1.15))
    ax.legend()
    save(fig, "recall_at_k.png")

    fig, ax = plt.subplots(figsize=(6, 3.5))
    a = ax.plot(steps, s["regret"], marker="o", ms=3, color="C0", label="regret")
    ax.set(xlabel="step after growth", ylabel="regret (loss)")
    ax2 = ax.twinx()
    b = ax2.plot(steps, s["relative_regret"], ls="--", color="C1", label="relative regret")
    ax2.set(ylabel="relative regret", ylim=(-0.05, 1.05))
    ax.legend(handles=a + b, loc="upper right")
    save(fig, "regret.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    for spec, curve in curves.items():
        x, y = zip(*sorted(curve)) if curve else ((), ())
        win = spec == s["final_best"]
        ax.plot(x, y, color="C3" if win else "grey", lw=2.2 if win else 0.8, alpha=1 if win else 0.6,
                label=f"{spec} (final best)" if win else None, zorder=3 if win else 2)
    ax.set(xlabel="step after growth", ylabel="validation loss")
    ax.legend()
    save(fig, "probe_curves.png")


def analyze(curves: Curves, finals: dict[str, float] | None, out_dir: str,
            tensorboard_dir: str | None = None) -> dict:
    """Every metric above, written to out_dir/lag_analysis.json plus five PNGs (and TensorBoard
    scalars when asked); returns the summary that was written."""
    if len(curves) < 2:
        raise ValueError(f"LAG analysis needs at least 2 candidates, got {len(curves)}")
    steps, specs, losses = align(curves)
    if len(steps) == 0:
        raise ValueError(f"LAG analysis: the {len(specs)} candidates' curves have no step in common")
    if finals is None:
        fin, source = losses[:, -1], f"probe loss at step {int(steps[-1])}"
    else:
        missing = [s for s in specs if s not in finals]
        if missing:
            raise ValueError(f"LAG analysis: no final loss for {', '.join(missing)}")
        fin, source = np.array([finals[s] for s in specs], dtype=float), "full training"
    pearson, spearman = correlations_with_final(losses, fin)
    sc = self_correlation(losses)
    recalls = {str(k): recall_at_k(losses, fin, k) for k in range(1, min(3, len(specs)) + 1)}
    reg, rel = regret(losses, fin)
    settle = settling_step(steps, losses, fin)
    s = {"steps": steps.tolist(), "specs": specs, "finals_from": source,
         "final_losses": dict(zip(specs, _json_safe(fin))), "final_best": specs[int(np.argmin(fin))],
         "chosen": [specs[i] for i in _chosen(losses)], "pearson": _json_safe(pearson),
         "spearman": _json_safe(spearman), "recall_at_k": {k: v.tolist() for k, v in recalls.items()},
         "regret": _json_safe(reg), "relative_regret": _json_safe(rel), "settling_step": settle,
         "self_correlation": [_json_safe(row) for row in sc]}
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "lag_analysis.json"), "w") as f:
        json.dump(s, f, indent=1)
    _plots(out_dir, s, curves, sc)
    if tensorboard_dir:
        from torch.utils.tensorboard import SummaryWriter  # here: the metrics need no torch
        series = {"pearson": pearson, "spearman": spearman, "regret": reg, "relative_regret": rel,
                  **{f"recall@{k}": v for k, v in recalls.items()}}
        w = SummaryWriter(tensorboard_dir)
        for name, values in series.items():
            for t, v in zip(steps, values):
                if math.isfinite(float(v)):  # NaN correlations would only break the chart
                    w.add_scalar(f"lag/{name}", float(v), int(t))
        w.close()
    return s


def analyze_lag_dir(lag_dir: str) -> dict:
    """Analyse one LAG's probes; figures, TensorBoard scalars and lag_analysis.json go beside them, in analysis/."""
    curves, finals = load_probe_results(lag_dir)
    target = os.path.join(os.path.dirname(os.path.normpath(lag_dir)), "analysis")
    return analyze(curves, finals, target, tensorboard_dir=os.path.join(target, "tb"))


def analyze_run(path: str) -> dict[str, dict]:
    """Analyse every LAG of a run (or of one stage, or one study)."""
    found = lag_dirs(path)
    if not found:
        raise MegagrowError(f"{path}: no LAG probes here (expected */lag/*/result.json)")
    return {lag: analyze_lag_dir(lag) for lag in found}
