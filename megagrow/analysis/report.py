"""A staged run's report: loss vs FLOPs and tokens per stage, growth points, decisions, speed-up.

Speed-up (paper 002's definition): the ratio of the FLOPs a scratch run of the target and the staged
run need to reach the same validation loss. The common loss is the higher of the two final losses:
when the staged run ends lower, it is the baseline's final loss (baseline FLOPs / the staged run's
FLOPs to get there); otherwise the staged run's final loss (the baseline's FLOPs to get there / the
staged run's FLOPs, below 1). FLOPs at a loss are read off the validation curves, linearly between
evaluations.
"""

from __future__ import annotations

import os

import numpy as np

from megagrow.runs.directory import RunDir, write_json


def flops_to_reach(curve: list[tuple[float, float]], loss: float) -> float | None:
    """FLOPs at which a (flops, loss) curve first reaches `loss`, linearly interpolated; None if never."""
    for (f0, l0), (f1, l1) in zip([(0.0, float("inf"))] + curve[:-1], curve):
        if l1 <= loss:
            if not np.isfinite(l0) or l0 == l1:
                return f1
            return f0 + (f1 - f0) * (l0 - loss) / (l0 - l1)
    return None


def loss_at(curve: list[tuple[float, float]], flops: float) -> float | None:
    xs, ys = [c[0] for c in curve], [c[1] for c in curve]
    if not xs or flops < xs[0] or flops > xs[-1] * 1.0001:
        return None
    return float(np.interp(flops, xs, ys))


def speedup(staged: list[tuple[float, float]], baseline: list[tuple[float, float]]) -> dict:
    staged_flops, staged_loss = staged[-1]
    base_flops, base_loss = baseline[-1]
    if staged_loss <= base_loss:
        level, ratio = base_loss, base_flops / flops_to_reach(staged, base_loss)
    else:
        reach = flops_to_reach(baseline, staged_loss)
        level, ratio = staged_loss, (reach or base_flops) / staged_flops
    return {"staged_flops": staged_flops, "staged_final_valid_loss": staged_loss, "baseline_flops": base_flops,
            "baseline_final_valid_loss": base_loss, "common_loss": level, "speedup": ratio,
            "staged_flops_to_common_loss": flops_to_reach(staged, level),
            "baseline_flops_to_common_loss": flops_to_reach(baseline, level),
            "baseline_valid_loss_at_staged_flops": loss_at(baseline, staged_flops)}


def _plot(path: str, stages: list, baseline: dict | None, x_of, xlabel: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (name, m, _) in enumerate(stages):
        color = f"C{i}"
        ax.plot([x_of(r) for r in m["train"]], [r["lm loss"] for r in m["train"]], color=color, alpha=0.35, lw=0.8)
        ax.plot([x_of(r) for r in m["valid"]], [r["lm loss"] for r in m["valid"]], "o-", color=color, ms=3,
                label=f"{name} (valid)")
        if i and m["train"]:
            ax.axvline(x_of(m["train"][0]), color="grey", ls=":", lw=1)
    if baseline:
        ax.plot([x_of(r) for r in baseline["valid"]], [r["lm loss"] for r in baseline["valid"]], "s--", color="k",
                ms=3, label="scratch baseline (valid)")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("lm loss")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _lag_section(name: str, lag: dict, analysed: bool) -> list[str]:
    rows = [f"| {spec} | {loss:.4f} |" for spec, loss in sorted(lag["losses"].items(), key=lambda kv: kv[1])]
    failed = f" Failed probes (left out): {', '.join(lag['failed'])}." if lag["failed"] else ""
    return ["", f"LAG@{lag['k']} before {name}: picked **{lag['winner']}**.{failed}", "",
            f"| candidate | validation loss after {lag['k']} iterations |", "|---|---|", *rows] + (
            ["", f"![LAG probe curves]({name}/analysis/probe_curves.png)"] if analysed else [])


def write_report(run: RunDir, plan) -> dict:
    """report.md, report.json and the figures, from the run directory's files alone."""
    dirs = [run.stage(i, s.name) for i, s in enumerate(plan.stages)]
    stages = [(d.name, d.metrics(), d.decision()) for d in dirs]
    base = run.baseline()
    baseline = base.metrics() if os.path.isdir(base.dir) else None
    tokens = plan.tokens_per_iteration
    _plot(run.figure("loss_vs_flops.png"), stages, baseline, lambda r: r["flops"], "FLOPs")
    _plot(run.figure("loss_vs_tokens.png"), stages, baseline, lambda r: r["iteration"] * tokens, "tokens")

    # LAG's losing probes cost FLOPs too: from a LAG stage on, the staged run is charged for them.
    staged_curve, overhead, lag_lines = [], 0.0, []
    for d, (name, m, _) in zip(dirs, stages):
        lag = d.lag()
        if lag:
            overhead += lag["overhead_flops"]
            lag_lines += _lag_section(name, lag, os.path.isdir(d.analysis_dir))
        staged_curve += [(r["flops"] + overhead, r["lm loss"]) for r in m["valid"]]
    summary = {"stages": [{"name": n, "decision": d and {k: d[k] for k in ("iteration", "reason", "flops")},
                           "final_valid_loss": m["valid"][-1]["lm loss"] if m["valid"] else None}
                          for n, m, d in stages]}
    lines = ["# Staged run report", "", f"Target: {plan.target['num_layers']} layers, hidden "
             f"{plan.target['hidden_size']}; budget {plan.budget['flops']:.4g} FLOPs.", "",
             "| stage | stopped at iteration | FLOPs so far | final valid loss | decision |", "|---|---|---|---|---|"]
    for s in summary["stages"]:
        d = s["decision"] or {}
        loss = f"{s['final_valid_loss']:.4f}" if s["final_valid_loss"] is not None else "-"
        lines.append(f"| {s['name']} | {d.get('iteration', '-')} | {d.get('flops', 0):.4g} | {loss} | "
                     f"{d.get('reason', 'not finished')} |")
    if baseline and baseline["valid"] and staged_curve:
        summary.update(speedup(staged_curve, [(r["flops"], r["lm loss"]) for r in baseline["valid"]]))
        s = summary
        lines += ["", f"Staged run: final validation loss {s['staged_final_valid_loss']:.4f} after "
                  f"{s['staged_flops']:.4g} FLOPs. Scratch baseline: {s['baseline_final_valid_loss']:.4f} after "
                  f"{s['baseline_flops']:.4g} FLOPs."]
        lines.append(f"**Speed-up: {s['speedup']:.2f}x**: to reach validation loss {s['common_loss']:.4f} the "
                     f"staged run needs {s['staged_flops_to_common_loss']:.4g} FLOPs, the baseline "
                     f"{s['baseline_flops_to_common_loss'] or s['baseline_flops']:.4g}"
                     + ("" if s["baseline_flops_to_common_loss"] else " (it never gets there: a lower bound)") + ".")
        if s["speedup"] < 1.5:
            lines.append(f"This is below the 1.5x the papers report (measured {s['speedup']:.2f}x).")
        if s["baseline_valid_loss_at_staged_flops"] is not None:
            lines.append(f"At equal FLOPs the baseline's validation loss is {s['baseline_valid_loss_at_staged_flops']:.4f}.")
    if overhead:
        lines.append(f"The staged FLOPs include {overhead:.4g} FLOPs of LAG probes that were not kept.")
    lines += lag_lines
    lines += ["", "![loss vs FLOPs](loss_vs_flops.png)", "", "![loss vs tokens](loss_vs_tokens.png)", ""]
    with open(run.report_md + ".tmp", "w") as f:
        f.write("\n".join(lines))
    os.replace(run.report_md + ".tmp", run.report_md)
    write_json(run.report_json, summary)
    return summary
