"""A pair stage: two small models trained side by side, for MixtureGrowth (growth.mixture) into the next stage.

Plan entry (the first stage's `pair`, the next stage growing with `grow: {op: mixture}`):
    pair: {seeds: [1234, 1235], data_path: [[prefix...], [prefix...]]}
`seeds` (default: the run's --seed and the next) set each model's initialisation and data order, `data_path`
(optional) gives each model its own shards. Each model is a job step on half the stage's processes, both at
once, started and ended through the same narrow interface as LAG probes (lag.probe.ProbeSteps: start,
finished, say), in `stage<i>_<name>/pair1/` and `pair2/`. The stage stops at a fixed iteration (iters,
tokens, formula) so that both stop together. Once both have, the stage's own metrics.jsonl holds the
two models' mean loss against their summed FLOPs (what the budget pays for both) and its decision.json
both decisions; the mixture checkpoint counts both models' FLOPs too (growth.mixture), so the next stage's
budget rule charges them.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace

from megagrow.launching.job_step import kill_stale
from megagrow.lag.probe import ProbeSteps
from megagrow.runs.directory import StageDir, write_json
from megagrow.scheduling.timing import PlanError, StopRule


def seeds(stage, training: dict) -> list[int]:
    base = {**training, **stage.training}.get("seed", 1234)  # the trainer's default --seed
    return list(stage.pair.get("seeds") or [base, base + 1])


def members(stage, where: StageDir, training: dict) -> list[tuple[object, StageDir]]:
    """Each model of the pair as a stage of its own (half the processes, its seed and data) and its folder."""
    nproc = stage.parallel.get("nproc", 1) // 2
    data = stage.pair.get("data_path") or [None, None]
    out = []
    for k, (seed, path) in enumerate(zip(seeds(stage, training), data), 1):
        flags = {**stage.training, "seed": seed, **({"data_path": path} if path else {})}
        out.append((replace(stage, name=f"{stage.name}_pair{k}", pair=None, training=flags,
                            parallel={**stage.parallel, "nproc": nproc}), StageDir(where.dir, f"pair{k}")))
    return out


class PairTraining:
    """Both models of a pair stage; `run()` returns the stage's decision once both have stopped."""

    def __init__(self, steps: ProbeSteps, stage, where: StageDir, start: int, rule: StopRule, training: dict):
        self.steps, self.where, self.start, self.rule = steps, where, start, rule
        self.members = members(stage, where, training)

    def launch(self, member, folder: StageDir):
        return self.steps.start(member, folder, self.start, self.rule, None, folder.pid_file)

    def run(self) -> dict:
        running = {}
        for member, folder in self.members:
            kill_stale(folder.pid_file)
            if folder.decision() is None:  # a model that stopped earlier is not run again
                running[folder.name] = (self.launch(member, folder), folder)
        self.steps.say(f"[{self.where.name}] training two models side by side ({len(running)} to run), each on "
                       f"{self.members[0][0].parallel.get('nproc', 1)} processes")
        try:
            while running:
                time.sleep(0.5)
                for name, (step, folder) in list(running.items()):
                    rc = step.poll()
                    if rc is None:
                        continue
                    step.wait()
                    del running[name]
                    self.steps.finished(step)
                    if rc != 0 or folder.decision() is None:
                        raise PlanError(f"stage {self.where.name}: its model {name} failed (exit code {rc}); "
                                        f"see {folder.log}")
        finally:
            for step, _ in running.values():  # the other model, when one failed or a signal came
                step.kill()
                step.wait()
                self.steps.finished(step)
        return self.record()

    def record(self) -> dict:
        """The stage's metrics (mean loss, summed FLOPs) and decision from both models'."""
        (_, a), (_, b) = self.members
        da, db = a.decision(), b.decision()
        if da["iteration"] != db["iteration"]:
            raise PlanError(f"stage {self.where.name}: its models stopped at iterations {da['iteration']} and "
                            f"{db['iteration']}, not together")
        ma, mb = a.metrics(), b.metrics()
        lines = []
        for kind in ("train", "valid"):
            other = {r["iteration"]: r for r in mb[kind]}
            for r in ma[kind]:
                if r["iteration"] in other:
                    s = other[r["iteration"]]
                    lines.append(json.dumps({**r, "lm loss": (r["lm loss"] + s["lm loss"]) / 2,
                                             "flops": r["flops"] + s["flops"]}))
        with open(self.where.metrics_file + ".tmp", "w") as f:
            f.write("".join(line + "\n" for line in lines))
        os.replace(self.where.metrics_file + ".tmp", self.where.metrics_file)
        decision = {"iteration": da["iteration"], "reason": f"pair: {da['reason']}", "policy": da["policy"],
                    "flops": da["flops"] + db["flops"], "members": {a.name: da, b.name: db}}
        write_json(self.where.decision_file, decision)  # last: it marks the stage done
        self.steps.say(f"[{self.where.name}] both models stopped at iteration {da['iteration']}: {da['reason']}")
        return decision


def pair_checkpoints(where: StageDir) -> tuple[str, str]:
    """The two models' checkpoints of a pair stage (mixture's --load and --load-second)."""
    return StageDir(where.dir, "pair1").ckpt, StageDir(where.dir, "pair2").ckpt
