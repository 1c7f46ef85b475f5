"""LAG probing at a stage boundary (Landscape-Aware Growing, paper 000): grow the previous stage's
checkpoint with every candidate operator, train each grown model k iterations, keep the lowest
validation loss and continue from that probe's own checkpoint (no compute thrown away for the winner).

Probes are job steps running `groups` at a time, each on the stage's processes; all start from the
same iteration and consumed-sample count, so they see the same batches in the same order. Each
writes `result.json` (its validation curve, steps counted from the growth) when it finishes; a probe
that exits non-zero or runs past `time_limit` seconds is killed, marked failed, logged and left out.
A re-run reuses every result on disk and only re-runs probes that have none. Once the winner is
known, the analyses of the probes (lag.analysis) are written beside them.

Plan entry (a stage's `grow`):  {select: lag, k: 50, space: true | dup, candidates: [specs], groups: 2,
time_limit: 900, parallel: {nproc: 8, ...}}. `parallel` is each probe's share (default: the
stage's own). `space` adds LAG's design space for L -> L' (every p, every b dividing k, init dup
and random, or dup only), `candidates` adds any operator specs; at least one of them.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import replace
from typing import Protocol

from megagrow.launching.job_step import JobStep, kill_stale
from megagrow.runs.directory import StageDir
from megagrow.scheduling.timing import PlanError, StopRule


def design_space(old_layers: int, new_layers: int, inits=("dup", "random")) -> list[str]:
    """Every LAG operator for L -> L': p in 1..L-k+1, b dividing k, each init."""
    k = new_layers - old_layers
    if k < 1 or k > old_layers:
        raise PlanError(f"LAG's design space needs 0 < L' - L <= L, got {old_layers} -> {new_layers}")
    return [f"lag:p={p},b={b},init={init}" for p in range(1, old_layers - k + 2)
            for b in range(1, k + 1) if k % b == 0 for init in inits]


def is_lag_selection(grow: dict | None) -> bool:
    return bool(grow) and grow.get("select") == "lag"


def candidates(grow: dict, old_layers: int, new_layers: int) -> list[str]:
    out = list(grow.get("candidates") or [])
    space = grow.get("space", not out)
    if space:
        out += design_space(old_layers, new_layers, ("dup",) if space == "dup" else ("dup", "random"))
    if not out:
        raise PlanError("grow.select lag: no candidates (give `space: true` or `candidates: [...]`)")
    return list(dict.fromkeys(out))  # once each, in order


def probe_stage(stage):
    """The stage as a probe runs it: `grow.parallel` (a share of the allocation) when given; a probe is
    not itself a LAG stage."""
    return replace(stage, parallel=stage.grow.get("parallel") or stage.parallel, grow=None)


class ProbeSteps(Protocol):
    """What probing needs from the staged run: grow a candidate, run and end a job step, report."""

    def grow(self, source, stage, previous: StageDir, where: StageDir, spec: str) -> None: ...

    def start(self, stage, where: StageDir, start: int, rule: StopRule, eval_interval: int | None,
              pid_file: str) -> JobStep: ...

    def finished(self, step: JobStep) -> None:
        """The step ended (or was killed): forget it; raises launching.Interrupted after a signal."""

    def say(self, message: str) -> None: ...


class LagProbing:
    """Probes for one stage entry; `run()` returns the winner's spec after moving its checkpoint into place."""

    def __init__(self, steps: ProbeSteps, source, stage, previous: StageDir, where: StageDir, start: int,
                 old_layers: int, new_layers: int, step_flops: float, eval_interval: int | None):
        self.steps, self.source, self.stage, self.previous = steps, source, stage, previous
        self.where, self.start, self.step_flops = where, start, step_flops
        self.k = int(stage.grow["k"])
        self.specs = candidates(stage.grow, old_layers, new_layers)
        self.groups = int(stage.grow.get("groups", 1))
        self.time_limit = stage.grow.get("time_limit")
        self.every = min(eval_interval or max(1, self.k // 5), self.k)
        self.probes = {spec: where.probe(spec) for spec in self.specs}

    def _start(self, spec: str) -> JobStep:
        probe = self.probes[spec]
        shutil.rmtree(probe.dir, ignore_errors=True)  # an interrupted probe starts over
        os.makedirs(probe.dir)
        return self.launch(spec)

    def launch(self, spec: str) -> JobStep:
        """Grow the candidate and start its k iterations."""
        probe = self.probes[spec]
        self.steps.grow(self.source, self.stage, self.previous, probe, spec)
        rule = StopRule(policy="iters", iteration=self.start + self.k, start=self.start)
        return self.steps.start(probe_stage(self.stage), probe, self.start, rule, self.every, probe.pid_file)

    def _finish(self, spec: str, rc: int | None, started: float) -> None:
        probe, seconds = self.probes[spec], time.time() - started
        if rc is None:
            reason = f"ran past the time limit of {self.time_limit} s"
        elif rc != 0 or probe.decision() is None:
            reason = f"exited with code {rc}"
        else:
            valid = probe.metrics()["valid"]
            curve = [[r["iteration"] - self.start, r["lm loss"]] for r in valid if r["iteration"] > self.start]
            probe.write_result({"spec": spec, "status": "done", "curve": curve, "final_loss": None,
                                "flops": valid[-1]["flops"], "started": started, "ended": time.time()})
            self.steps.say(f"[{self.where.name}] probe {spec}: validation loss {curve[-1][1]:.4f} after {self.k} "
                           f"iterations ({seconds:.0f} s)")
            return
        probe.write_result({"spec": spec, "status": "failed", "reason": reason, "curve": [], "final_loss": None})
        print(f"[{self.where.name}] probe {spec} FAILED ({reason}); left out of the selection "
              f"(log: {probe.log})", file=sys.stderr, flush=True)

    def run_probes(self) -> None:
        for probe in self.probes.values():
            kill_stale(probe.pid_file)
        todo = [s for s in self.specs if self.probes[s].result() is None]
        reused = len(self.specs) - len(todo)
        self.steps.say(f"[{self.where.name}] LAG@{self.k}: {len(self.specs)} candidates, {self.groups} at a time"
                       + (f", {reused} finished earlier" if reused else ""))
        running: dict[str, JobStep] = {}
        while todo or running:
            while todo and len(running) < self.groups:
                spec = todo.pop(0)
                running[spec] = self._start(spec)
            time.sleep(0.5)
            for spec, step in list(running.items()):
                rc = step.poll()
                late = self.time_limit and time.time() - step.started > float(self.time_limit)
                if rc is None and not late:
                    continue
                if rc is None:
                    step.kill()
                step.wait()
                self.steps.finished(step)
                self._finish(spec, None if rc is None else rc, step.started)
                del running[spec]

    def run(self) -> str:
        from megagrow.lag.analysis import analyze_lag_dir
        self.run_probes()
        done = {s: r for s in self.specs if (r := self.probes[s].result()) and r["status"] == "done"}
        if not done:
            raise PlanError(f"stage {self.where.name}: every LAG probe failed; see {self.where.lag_dir}")
        winner = min(done, key=lambda s: done[s]["curve"][-1][1])
        # The losers' k iterations are the price of the choice (a failed probe's partial work is not counted).
        record = {"k": self.k, "winner": winner, "winner_loss": done[winner]["curve"][-1][1],
                  "candidates": self.specs, "failed": [s for s in self.specs if s not in done],
                  "losses": {s: r["curve"][-1][1] for s, r in done.items()},
                  "overhead_flops": (len(done) - 1) * self.k * self.step_flops, "start": self.start}
        if len(done) >= 2:
            analyze_lag_dir(self.where.lag_dir)
        self.where.write_lag(record)
        self.steps.say(f"[{self.where.name}] LAG@{self.k} picked {winner} (validation loss "
                       f"{record['winner_loss']:.4f} of {len(done)} probes); continuing from its checkpoint")
        probe = self.probes[winner]
        shutil.copyfile(probe.metrics_file, self.where.metrics_file)
        os.replace(probe.ckpt, self.where.ckpt)  # last: a tracker in the stage's ckpt means LAG is over
        return winner
