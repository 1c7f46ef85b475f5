"""LAG probing at a stage boundary (Landscape-Aware Growing, paper 000): grow the previous stage's
checkpoint with every candidate operator, train each grown model k iterations, keep the lowest
validation loss and continue from that probe's own checkpoint (no compute thrown away for the winner).

Probes are job steps running `groups` at a time, each on the stage's processes; all start from the
same iteration and consumed-sample count, so they see the same batches in the same order. Each
writes `result.json` (its validation curve, steps counted from the growth) when it finishes; a probe
that exits non-zero or runs past `time_limit` seconds is killed, marked failed, logged and left out.
A re-run reuses every result on disk and only re-runs probes that have none.

Plan entry (a stage's `grow`):  {op: "lag:k=50", space: true | dup, candidates: [specs], groups: 2,
time_limit: 900, parallel: {nproc: 8, ...}}. `parallel` is each probe's share (default: the
stage's own). `space` adds LAG's design space for L -> L' (every p, every b dividing k, init dup
and random, or dup only), `candidates` adds any operator specs; at least one of them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time

from megagrow.launching.local import kill_stale
from megagrow.scheduling.timing import PlanError, StopRule


def design_space(old_layers: int, new_layers: int, inits=("dup", "random")) -> list[str]:
    """Every LAG operator for L -> L': p in 1..L-k+1, b dividing k, each init."""
    k = new_layers - old_layers
    if k < 1 or k > old_layers:
        raise PlanError(f"LAG's design space needs 0 < L' - L <= L, got {old_layers} -> {new_layers}")
    return [f"lag:p={p},b={b},init={init}" for p in range(1, old_layers - k + 2)
            for b in range(1, k + 1) if k % b == 0 for init in inits]


def lag_k(op: str) -> int | None:
    """k of a `lag:k=K` stage entry, None for any other operator spec."""
    m = re.fullmatch(r"lag:k=(\d+)", op.strip())
    return int(m.group(1)) if m else None


def candidates(grow: dict, old_layers: int, new_layers: int) -> list[str]:
    out = list(grow.get("candidates") or [])
    space = grow.get("space", not out)
    if space:
        out += design_space(old_layers, new_layers, ("dup",) if space == "dup" else ("dup", "random"))
    if not out:
        raise PlanError(f"{grow['op']}: no candidates (give `space: true` or `candidates: [...]`)")
    return list(dict.fromkeys(out))  # once each, in order


def slug(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", spec).strip("_")


class LagProbing:
    """Probes for one stage entry; `run()` returns the winner's spec after moving its checkpoint into place."""

    def __init__(self, driver, source, stage, previous, where, start: int):
        from megagrow.scheduling.driver import StageRun
        self.driver, self.source, self.stage, self.previous = driver, source, stage, previous
        self.where, self.start = where, start
        self.k = lag_k(stage.grow["op"])
        old, new = driver.plan.model_args(source).num_layers, driver.plan.model_args(stage).num_layers
        self.specs = candidates(stage.grow, old, new)
        self.groups = int(stage.grow.get("groups", 1))
        self.time_limit = stage.grow.get("time_limit")
        self.dir = os.path.join(where.dir, "lag")
        self.probes = {spec: StageRun(self.dir, slug(spec)) for spec in self.specs}

    def result(self, spec: str) -> dict | None:
        path = os.path.join(self.probes[spec].dir, "result.json")
        if not os.path.exists(path):
            return None
        with open(path) as f:
            return json.load(f)

    def _write_result(self, spec: str, record: dict) -> None:
        path = os.path.join(self.probes[spec].dir, "result.json")
        with open(path + ".tmp", "w") as f:
            json.dump({"spec": spec, **record}, f, indent=1)
        os.replace(path + ".tmp", path)

    def _start(self, spec: str):
        d = self.driver
        probe = self.probes[spec]
        shutil.rmtree(probe.dir, ignore_errors=True)  # an interrupted probe starts over
        os.makedirs(probe.dir)
        d.grow(self.source, self.stage, self.previous, probe, op=spec)
        rule = StopRule(policy="iters", iteration=self.start + self.k, start=self.start)
        stage = self.probe_stage()
        every = d.plan.training.get("eval_interval") or max(1, self.k // 5)
        return d.launch(stage, probe, self.start, rule, None, min(every, self.k),
                        os.path.join(probe.dir, "step.pgid"))

    def probe_stage(self):
        """The stage as a probe runs it: `grow.parallel` (a share of the allocation) when given."""
        from dataclasses import replace
        return replace(self.stage, parallel=self.stage.grow.get("parallel") or self.stage.parallel)

    def _finish(self, spec: str, rc: int | None, started: float) -> None:
        probe, seconds = self.probes[spec], time.time() - started
        if rc is None:
            reason = f"ran past the time limit of {self.time_limit} s"
        elif rc != 0 or probe.decision() is None:
            reason = f"exited with code {rc}"
        else:
            from megagrow.analysis.report import read_metrics
            valid = read_metrics(os.path.join(probe.dir, "metrics.jsonl"))["valid"]
            curve = [[r["iteration"] - self.start, r["lm loss"]] for r in valid if r["iteration"] > self.start]
            self._write_result(spec, {"status": "done", "curve": curve, "final_loss": None,
                                      "flops": valid[-1]["flops"], "started": started, "ended": time.time()})
            self.driver.say(f"[{self.where.name}] probe {spec}: validation loss {curve[-1][1]:.4f} after {self.k} "
                            f"iterations ({seconds:.0f} s)")
            return
        self._write_result(spec, {"status": "failed", "reason": reason, "curve": [], "final_loss": None})
        print(f"[{self.where.name}] probe {spec} FAILED ({reason}); left out of the selection "
              f"(log: {os.path.join(probe.dir, 'log.txt')})", file=sys.stderr, flush=True)

    def run_probes(self) -> None:
        for probe in self.probes.values():
            kill_stale(os.path.join(probe.dir, "step.pgid"))
        todo = [s for s in self.specs if self.result(s) is None]
        reused = len(self.specs) - len(todo)
        self.driver.say(f"[{self.where.name}] LAG@{self.k}: {len(self.specs)} candidates, {self.groups} at a time"
                        + (f", {reused} finished earlier" if reused else ""))
        running: dict[str, object] = {}
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
                self.driver.running.discard(step)
                if self.driver.interrupted:
                    from megagrow.scheduling.driver import Interrupted
                    raise Interrupted("LAG probes stopped on a signal; run the same command again to resume")
                self._finish(spec, None if rc is None else rc, step.started)
                del running[spec]

    def run(self) -> str:
        self.run_probes()
        done = {s: r for s in self.specs if (r := self.result(s)) and r["status"] == "done"}
        if not done:
            raise PlanError(f"stage {self.where.name}: every LAG probe failed; see {self.dir}")
        winner = min(done, key=lambda s: done[s]["curve"][-1][1])
        # The losers' k iterations are the price of the choice (a failed probe's partial work is not counted).
        overhead = (len(done) - 1) * self.k * self.driver.plan.step_flops(self.stage)
        record = {"k": self.k, "winner": winner, "winner_loss": done[winner]["curve"][-1][1],
                  "candidates": self.specs, "failed": [s for s in self.specs if s not in done],
                  "losses": {s: r["curve"][-1][1] for s, r in done.items()},
                  "overhead_flops": overhead, "start": self.start}
        with open(os.path.join(self.where.dir, "lag.json"), "w") as f:
            json.dump(record, f, indent=1)
        self.driver.say(f"[{self.where.name}] LAG@{self.k} picked {winner} (validation loss "
                        f"{record['winner_loss']:.4f} of {len(done)} probes); continuing from its checkpoint")
        probe = self.probes[winner]
        shutil.copyfile(os.path.join(probe.dir, "metrics.jsonl"), os.path.join(self.where.dir, "metrics.jsonl"))
        os.replace(probe.ckpt, self.where.ckpt)  # last: a tracker in the stage's ckpt means LAG is over
        return winner
