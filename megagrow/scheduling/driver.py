"""`megagrow run PLAN`: train each stage as its own distributed job step, grow in between, resume anywhere.

Run directory:
    plan.yaml                   the plan this run follows (a re-run with another plan is refused)
    stage<i>_<name>/ckpt/       the stage's checkpoints (Megatron layout); its first is the grown one
    stage<i>_<name>/metrics.jsonl, tb/, log.txt
    stage<i>_<name>/decision.json   written once the stage's stop rule fired and its checkpoint is saved
    baseline/                   the target trained from scratch on the same budget (--baseline)
    report.md, *.png            (analysis.report)
A stage with a decision is done and skipped on a re-run; a stage with a checkpoint resumes from its
latest one; growth output is renamed into place only when complete. So killing the driver or a
stage at any moment and re-running the same command finishes the same run.
"""

from __future__ import annotations

import json
import os
import signal

from megagrow.checkpoint.errors import read_tracker
from megagrow.lag.probe import LagProbing, lag_k
from megagrow.launching.local import JobStep, kill_stale
from megagrow.launching.slurm import make_launcher
from megagrow.scheduling.plan import Plan, Stage, dump_plan, load_plan
from megagrow.scheduling.timing import PlanError, StopRule

_SHOWN = ("iteration", "validation", "stage stop", "loaded checkpoint", "growth masks", "LR schedule", "error",
          "Error", "Traceback")
_CONTROLLED = ("train_iters", "lr_decay_iters", "save", "load", "metrics_file", "tensorboard_dir")


def as_flags(values: dict) -> list[str]:
    """Megatron-LM flags from a plan's dict: true -> the bare flag, false/None -> left out."""
    out = []
    for key, value in values.items():
        flag = "--" + key.replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            out.append(flag)
        elif isinstance(value, (list, tuple)):
            out += [flag, *map(str, value)]
        else:
            out += [flag, str(value)]
    return out


class StageRun:
    """Where one stage (or the baseline) lives in the run directory."""

    def __init__(self, run_dir: str, name: str):
        self.dir = os.path.join(run_dir, name)
        self.name = name
        self.ckpt = os.path.join(self.dir, "ckpt")
        self.decision_file = os.path.join(self.dir, "decision.json")

    def decision(self) -> dict | None:
        if not os.path.exists(self.decision_file):
            return None
        with open(self.decision_file) as f:
            return json.load(f)


class Interrupted(Exception):
    """SIGTERM/SIGUSR1 reached the driver: the running stage saved its checkpoint; re-run to resume."""


class Driver:
    def __init__(self, plan_path: str, run_dir: str, progress: bool = True, launcher: str = "auto"):
        self.plan: Plan = load_plan(plan_path)
        self.launcher = make_launcher(launcher)
        self.running: set = set()
        self.interrupted = False
        self.run_dir, self.progress = run_dir, progress
        os.makedirs(run_dir, exist_ok=True)
        saved = os.path.join(run_dir, "plan.yaml")
        text = dump_plan(self.plan)
        if os.path.exists(saved):
            if dump_plan(load_plan(saved)) != text:
                raise PlanError(f"{run_dir} holds a run of another plan ({saved}); use a new --output directory")
        else:
            with open(saved + ".tmp", "w") as f:
                f.write(text)
            os.replace(saved + ".tmp", saved)
        self.pid_file = os.path.join(run_dir, "step.pgid")
        kill_stale(self.pid_file)
        self.total = sum(self.plan.planned_iterations())

    def say(self, message: str) -> None:
        if self.progress:
            print(message, flush=True)

    def stages(self) -> list[tuple[Stage, StageRun]]:
        return [(s, StageRun(self.run_dir, f"stage{i}_{s.name}")) for i, s in enumerate(self.plan.stages)]

    def _on_signal(self, signum, frame) -> None:
        """Before a time limit (or on scancel): every running stage saves and exits; so does the driver."""
        self.interrupted = True
        self.say(f"signal {signum}: asking the running steps to save and exit")
        for step in list(self.running):
            step.signal(signal.SIGTERM)

    def run(self, baseline: bool = False) -> dict:
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._on_signal)
        start, previous = 0, None
        for i, (stage, where) in enumerate(self.stages()):
            done = where.decision()
            if done:
                self.say(f"[{where.name}] done earlier: stopped at iteration {done['iteration']} ({done['reason']})")
            else:
                if previous is not None and read_tracker(where.ckpt) is None:
                    if lag_k(stage.grow["op"]) is not None:  # choose the operator by LAG, continue from the winner
                        LagProbing(self, self.plan.stages[i - 1], stage, previous, where, start).run()
                    else:
                        self.grow(self.plan.stages[i - 1], stage, previous, where)
                done = self.train(stage, where, start, self.rule(i, start))
            start, previous = done["iteration"], where
        if baseline:
            target = Stage(name="baseline", parallel=dict(self.plan.stages[-1].parallel))
            where = StageRun(self.run_dir, "baseline")
            if not where.decision():
                self.train(target, where, 0, StopRule(policy="flops", flops=self.plan.budget["flops"]),
                           decay_iters=int(self.plan.budget["flops"] // self.plan.step_flops()))
        from megagrow.analysis.report import write_report
        return write_report(self.run_dir, self.plan)

    def rule(self, index: int, start: int) -> StopRule:
        stage = self.plan.stages[index]
        extra = {"start": start}
        policy = stage.stop["policy"]
        if policy == "flops":  # the budget pays for LAG's discarded probes too
            extra["flops"] = self.plan.budget["flops"] - self.lag_overhead(index)
        if policy == "ecr":
            nxt = self.plan.stages[index + 1]
            extra["flops_ratio"] = self.plan.step_flops(stage) / self.plan.step_flops(nxt)
            if "law" not in stage.stop:
                extra["law"] = self.probe_law(nxt, int(stage.stop.get("probe_iters", 50)))
        return StopRule.from_plan({k: v for k, v in stage.stop.items() if k != "probe_iters"},
                                  self.plan.tokens_per_iteration, **extra)

    def lag_overhead(self, upto: int) -> float:
        """FLOPs of LAG probes that were not kept, in stages up to `upto`."""
        total = 0.0
        for _, where in self.stages()[:upto + 1]:
            path = os.path.join(where.dir, "lag.json")
            if os.path.exists(path):
                with open(path) as f:
                    total += json.load(f)["overhead_flops"]
        return total

    def probe_law(self, stage: Stage, iters: int) -> dict:
        """The next model's loss law, fitted on a short run of it from scratch (paper 002's predicted curve)."""
        where = StageRun(self.run_dir, f"probe_{stage.name}")
        law_file = os.path.join(where.dir, "law.json")
        if not os.path.exists(law_file):
            if not where.decision():
                self.train(Stage(name=f"probe_{stage.name}", model=stage.model, parallel=stage.parallel), where, 0,
                           StopRule(policy="iters", iteration=iters), eval_interval=max(1, iters // 10))
            from megagrow.analysis.report import read_metrics
            from megagrow.scheduling.timing import fit_loss_law
            valid = read_metrics(os.path.join(where.dir, "metrics.jsonl"))["valid"]
            law = fit_loss_law([r["iteration"] for r in valid], [r["lm loss"] for r in valid])
            record = {"a": law.a, "b": law.b, "c": law.c, "probe_flops": valid[-1]["flops"]}
            with open(law_file + ".tmp", "w") as f:
                json.dump(record, f)
            os.replace(law_file + ".tmp", law_file)
            self.say(f"[{where.name}] loss law of {stage.name}: L(n) = {law.a:.4g} n^-{law.b:.4g} + {law.c:.4g}")
        with open(law_file) as f:
            record = json.load(f)
        return {k: record[k] for k in ("a", "b", "c")}

    def grow(self, source: Stage, stage: Stage, previous: StageRun, where: StageRun, op: str | None = None) -> None:
        from megagrow.growth.grow import grow, grow_width
        old, new = self.plan.model_args(source), self.plan.model_args(stage)
        par = stage.parallel
        tp, pp = par.get("tensor_model_parallel_size", 1), par.get("pipeline_model_parallel_size", 1)
        fmt = self.plan.training.get("ckpt_format", "torch_dist")
        force = os.path.isdir(where.ckpt)  # a growth that was killed: its output never got a tracker
        os.makedirs(where.dir, exist_ok=True)
        widths = ("hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups")
        op = op or stage.grow["op"]
        self.say(f"[{where.name}] growing {previous.name} ({old.num_layers} layers, hidden {old.hidden_size}) -> "
                 f"{new.num_layers} layers, hidden {new.hidden_size} with {op}")
        if any(getattr(old, w) != getattr(new, w) for w in widths):
            sizes = {w: getattr(new, w) if getattr(old, w) != getattr(new, w) else None for w in widths}
            grow_width(previous.ckpt, where.ckpt, op, sizes, tp, pp, fmt, force=force, progress=False)
        else:
            grow(previous.ckpt, where.ckpt, op, new.num_layers, tp, pp, fmt, force=force, progress=False)

    def stage_argv(self, stage: Stage, where: StageRun, start: int, rule: StopRule,
                   decay_iters: int | None, eval_interval: int | None = None) -> list[str]:
        plan, a = self.plan, self.plan.model_args(stage)
        par = {k: v for k, v in stage.parallel.items() if k != "nproc"}
        training = {k: v for k, v in plan.training.items() if k not in _CONTROLLED}
        if eval_interval:
            training["eval_interval"] = eval_interval
        lr = stage.lr.get("schedule", "continue")
        schedule = {"lr_decay_iters": decay_iters or self.total}
        if lr in ("rewarm", "constant") and start:
            schedule = {"restart_lr_schedule_at": start, "lr_decay_iters": max(self.total - start, 1),
                        "lr_warmup_iters": stage.lr.get("warmup_iters", 0 if lr == "constant" else
                                                        training.get("lr_warmup_iters", 0))}
            if lr == "constant":
                schedule["lr_decay_style"] = "constant"
        argv = ["pretrain_gpt.py", "--exit-signal-handler", *as_flags({**plan.target, **stage.model, "kv_channels": a.kv_channels}),
                *as_flags({**training, **schedule}), *as_flags(plan.data), *as_flags(par),
                "--train-iters", str(plan.max_iterations()), "--save", where.ckpt,
                "--metrics-file", os.path.join(where.dir, "metrics.jsonl"),
                "--tensorboard-dir", os.path.join(where.dir, "tb"),
                "--stage-stop", json.dumps(vars(rule)), "--stage-decision-file", where.decision_file]
        loaded = read_tracker(where.ckpt)
        if loaded is not None:
            argv += ["--load", where.ckpt]
        lag = os.path.join(where.dir, "lag.json")
        if loaded is not None and os.path.exists(lag):
            with open(lag) as f:
                record = json.load(f)
            if loaded == record["start"] + record["k"]:
                argv.append("--eval-on-start")  # evidence that the stage goes on from the winner's state
        return argv

    def launch(self, stage: Stage, where: StageRun, start: int, rule: StopRule, decay_iters: int | None,
               eval_interval: int | None, pid_file: str) -> JobStep:
        def show(line: str) -> None:
            if self.progress and any(key in line for key in _SHOWN):
                print(f"[{where.name}] {line.strip()}", flush=True)
        step = self.launcher.start(stage.parallel.get("nproc", 1),
                                   self.stage_argv(stage, where, start, rule, decay_iters, eval_interval),
                                   os.path.join(where.dir, "log.txt"), pid_file, on_line=show, name=where.name)
        self.running.add(step)
        return step

    def train(self, stage: Stage, where: StageRun, start: int, rule: StopRule, decay_iters: int | None = None,
              eval_interval: int | None = None) -> dict:
        os.makedirs(where.dir, exist_ok=True)
        resumed = read_tracker(where.ckpt)
        self.say(f"[{where.name}] training {self.plan.model_args(stage).num_layers} layers from iteration "
                 f"{resumed or start} until {rule.policy}" + (f" (resuming {where.ckpt})" if resumed else ""))
        step = self.launch(stage, where, start, rule, decay_iters, eval_interval, self.pid_file)
        try:
            rc = step.wait()
            while rc is None:  # wait() returns None only on a timeout; keep signals deliverable meanwhile
                rc = step.wait()
        finally:
            if step.poll() is None:
                step.kill()
                step.wait()
            self.running.discard(step)
        decision = where.decision()
        if decision is None and (self.interrupted or rc == 0):  # rc 0 without a decision: it saved on a signal
            raise Interrupted(f"stage {where.name} saved its checkpoint and stopped on a signal; run the same "
                              "command again (or requeue the job) to resume")
        if rc != 0 or decision is None:
            raise PlanError(f"stage {where.name} failed (exit code {rc}); see {os.path.join(where.dir, 'log.txt')}")
        self.say(f"[{where.name}] stopped at iteration {decision['iteration']}: {decision['reason']}")
        return decision


def run(plan_path: str, run_dir: str | None = None, baseline: bool = False, progress: bool = True,
        launcher: str = "auto") -> dict:
    if run_dir is None:
        run_dir = os.path.splitext(plan_path)[0] + "_run"
    return Driver(plan_path, run_dir, progress, launcher).run(baseline)


def dry_run(plan_path: str, launcher: str = "auto") -> list[tuple[str, list[str]]]:
    """Each stage's launch command (LAG stages: one per concurrent probe), as the launcher would run it."""
    import tempfile
    from dataclasses import replace
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        driver = Driver(plan_path, tmp, progress=False, launcher=launcher)
        start = 0
        for i, (stage, where) in enumerate(driver.stages()):
            stop = dict(stage.stop)
            if stop["policy"] == "ecr":
                stop.setdefault("law", {"a": 1.0, "b": 0.5, "c": 0.0})  # a probe would fit it
            stage_rule = StopRule.from_plan({k: v for k, v in stop.items() if k != "probe_iters"},
                                            driver.plan.tokens_per_iteration, start=start,
                                            flops=driver.plan.budget["flops"], flops_ratio=1.0)
            probes = stage.grow.get("groups", 1) if stage.grow and lag_k(stage.grow["op"]) else 1
            if probes > 1 or (stage.grow and lag_k(stage.grow["op"])):
                stage = replace(stage, parallel=stage.grow.get("parallel") or stage.parallel)
            argv = driver.stage_argv(stage, where, start, stage_rule, None)
            nproc = stage.parallel.get("nproc", 1)
            if driver.launcher.kind == "slurm":
                taken = set()
                for p in range(probes):
                    cmd, nodes = driver.launcher.command(nproc, argv, f"{where.name}-{p}")
                    driver.launcher.busy.update(nodes)
                    taken.update(nodes)
                    out.append((where.name if probes == 1 else f"{where.name} probe {p}", cmd))
                driver.launcher.busy.difference_update(taken)
            else:
                out.append((where.name, ["torchrun", "--nproc-per-node", str(nproc), *argv]))
            start += driver.plan.planned_iterations()[i]
    return out
