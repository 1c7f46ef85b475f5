"""`megagrow run PLAN`: train each stage as its own distributed job step, grow in between, resume anywhere.
A pair stage trains two models at once, each a job step on half its processes (scheduling.pair).

The run directory's files are runs.directory's. A stage with a decision is done and skipped on a
re-run; a stage with a checkpoint resumes from its latest one; growth output is renamed into place
only when complete. So killing the driver or a stage at any moment and re-running the same command
finishes the same run. `--dry-run` walks the same steps and prints, instead of running them, the
growth commands and the launcher's commands, exactly as they would run.
"""

from __future__ import annotations

import json
import os
import shlex
import signal

from megagrow.checkpoint.errors import read_tracker
from megagrow.lag.probe import LagProbing, is_lag_selection
from megagrow.launching import Resources, make_launcher
from megagrow.launching.job_step import Interrupted, JobStep, kill_stale
from megagrow.model.shape import WIDTH_FIELDS
from megagrow.runs.directory import RunDir, StageDir
from megagrow.scheduling.pair import PairTraining, pair_checkpoints
from megagrow.scheduling.plan import Plan, Stage, dump_plan, load_plan
from megagrow.scheduling.preflight import preflight
from megagrow.scheduling.timing import PlanError, StopRule, fit_loss_law
from megagrow.training.flags import to_argv
from megagrow.training.freezing import layer_ranges

_SHOWN = ("iteration", "validation", "stage stop", "loaded checkpoint", "growth masks", "LR schedule", "error",
          "Error", "Traceback")
_CONTROLLED = ("train_iters", "lr_decay_iters", "save", "load", "metrics_file", "tensorboard_dir")
_PLACEHOLDER_LAW = {"a": 1.0, "b": 0.5, "c": 0.0}  # a dry run cannot fit the probe's law


class Driver:
    def __init__(self, plan_path: str, run_dir: str, progress: bool = True, launcher: str = "auto",
                 resources: Resources | None = None):
        self.plan: Plan = load_plan(plan_path)  # checked whole before anything is written
        self.launcher = make_launcher(launcher, resources)
        self.run_dir = RunDir(os.path.abspath(run_dir))  # absolute: printed lines run from anywhere
        self.running: set[JobStep] = set()
        self.interrupted = False
        self.progress = progress
        self.total = sum(self.plan.planned_iterations())
        self.printed: list[str] | None = None  # a dry run's lines; None: really run

    def prepare(self, claim: bool = True, baseline: bool = False) -> None:
        """Check every stage as its processes will (scheduling.preflight: data, tokenizer, the trainer's own
        validation of each stage's flags, room in the launcher), then, with `claim`, claim the run directory:
        the same plan or none; no ranks of an earlier driver still running. A dry run checks, claims nothing."""
        preflight(self, baseline)
        if not claim:
            return
        text, saved = dump_plan(self.plan), self.run_dir.read_plan_text()
        if saved is None:
            self.run_dir.write_plan_text(text)
        elif dump_plan(load_plan(self.run_dir.plan_file)) != text:
            raise PlanError(f"{self.run_dir.root} holds a run of another plan ({self.run_dir.plan_file}); "
                            "use a new --output directory")
        kill_stale(self.run_dir.pid_file)

    def say(self, message: str) -> None:
        if self.progress and self.printed is None:
            print(message, flush=True)

    def stages(self) -> list[tuple[Stage, StageDir]]:
        return [(s, self.run_dir.stage(i, s.name)) for i, s in enumerate(self.plan.stages)]

    def _on_signal(self, signum, frame) -> None:
        """Before a time limit (or on scancel): every running stage saves and exits; so does the driver."""
        self.interrupted = True
        self.say(f"signal {signum}: asking the running steps to save and exit")
        for step in list(self.running):
            step.signal(signal.SIGTERM)

    def run(self, baseline: bool = False) -> dict:
        self.prepare(baseline=baseline)
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._on_signal)
        self._walk(baseline)
        from megagrow.analysis.report import write_report
        return write_report(self.run_dir, self.plan)

    def dry_run(self, baseline: bool = False) -> list[str]:
        """The shell lines a run from here would execute, in order (comments name the stage)."""
        self.prepare(claim=False, baseline=baseline)
        self.printed = []
        self._walk(baseline)
        return self.printed

    def _walk(self, baseline: bool) -> None:
        start, previous, overhead = 0, None, 0.0  # overhead: FLOPs of LAG probes not kept, so far
        planned = self.plan.planned_iterations()
        for i, (stage, where) in enumerate(self.stages()):
            done, cost = where.decision(), None
            if done:
                self.say(f"[{where.name}] done earlier: stopped at iteration {done['iteration']} ({done['reason']})")
            else:
                self._comment(where.name)
                if previous is not None and read_tracker(where.ckpt) is None:
                    source = self.plan.stages[i - 1]
                    if is_lag_selection(stage.grow):  # choose the operator by LAG, continue from the winner
                        cost = self._select_by_lag(source, stage, previous, where, start)
                    else:
                        self.grow(source, stage, previous, where, stage.grow["op"])
            overhead += cost if cost is not None else (where.lag() or {}).get("overhead_flops", 0.0)
            if not done and stage.pair:  # two models side by side, for mixture into the next stage
                done = self._train_pair(stage, where, start, self.rule(i, start, overhead))
            elif not done:
                done = self.train(stage, where, start, self.rule(i, start, overhead), loaded=previous is not None)
                if self.printed is not None:  # a dry run assumes each stage ends where the plan expects
                    done = {"iteration": start + planned[i]}
            start, previous = done["iteration"], where
        if baseline:
            target, where = Stage(name="baseline", parallel=dict(self.plan.stages[-1].parallel)), self.run_dir.baseline()
            if not where.decision():
                self._comment("baseline")
                self.train(target, where, 0, StopRule(policy="flops", flops=self.plan.budget["flops"]),
                           decay_iters=int(self.plan.budget["flops"] // self.plan.step_flops()))

    def _comment(self, text: str) -> None:
        if self.printed is not None:
            self.printed.append(f"# {text}")

    def _select_by_lag(self, source: Stage, stage: Stage, previous: StageDir, where: StageDir, start: int) -> float:
        """LAG probes into `stage`; returns the FLOPs of the probes that are not kept."""
        old, new = self.plan.shape(source).num_layers, self.plan.shape(stage).num_layers
        flops = self.plan.step_flops(stage)
        probing = LagProbing(self, source, stage, previous, where, start, old, new, flops,
                             self.plan.training.get("eval_interval"))
        if self.printed is None:
            probing.run()
            return where.lag()["overhead_flops"]
        for first in range(0, len(probing.specs), probing.groups):  # `groups` probes at a time, all succeeding
            slots = [probing.launch(spec) for spec in probing.specs[first:first + probing.groups]]
            for slot in slots:
                self.finished(slot)
        return (len(probing.specs) - 1) * probing.k * flops

    def _train_pair(self, stage: Stage, where: StageDir, start: int, rule: StopRule) -> dict:
        """Both models of a pair stage at once, each on half its processes; returns the stage's decision."""
        pair = PairTraining(self, stage, where, start, rule, self.plan.training)
        if self.printed is None:
            return pair.run()
        for slot in [pair.launch(*member) for member in pair.members]:
            self.finished(slot)
        return {"iteration": rule.iteration}

    def rule(self, index: int, start: int, lag_overhead: float, fit_law: bool = True) -> StopRule:
        """The stage's stop rule from `start`; `fit_law=False`: an ecr stage without a law gets a placeholder
        one instead of a probe run fitting it (the preflight's rule, which only renders the command line)."""
        stage = self.plan.stages[index]
        extra = {"start": start}
        policy = stage.stop["policy"]
        if policy == "flops":  # the budget pays for LAG's discarded probes too
            extra["flops"] = self.plan.budget["flops"] - lag_overhead
        if policy == "ecr":
            nxt = self.plan.stages[index + 1]
            extra["flops_ratio"] = self.plan.step_flops(stage) / self.plan.step_flops(nxt)
            if "law" not in stage.stop:
                extra["law"] = self.probe_law(nxt, int(stage.stop.get("probe_iters", 50))) if fit_law \
                    else dict(_PLACEHOLDER_LAW)
        return StopRule.from_plan({k: v for k, v in stage.stop.items() if k != "probe_iters"},
                                  self.plan.tokens_per_iteration, **extra)

    def probe_law(self, stage: Stage, iters: int) -> dict:
        """The next model's loss law, fitted on a short run of it from scratch (paper 002's predicted curve)."""
        where = self.run_dir.law_probe(stage.name)
        law = where.law()
        if law is None:
            if not where.decision():
                probe = Stage(name=f"probe_{stage.name}", model=stage.model, parallel=stage.parallel,
                              training=stage.training)
                self.train(probe, where, 0, StopRule(policy="iters", iteration=iters), eval_interval=max(1, iters // 10))
            if self.printed is not None:
                return dict(_PLACEHOLDER_LAW)
            valid = where.metrics()["valid"]
            fitted = fit_loss_law([r["iteration"] for r in valid], [r["lm loss"] for r in valid])
            law = {"a": fitted.a, "b": fitted.b, "c": fitted.c, "probe_flops": valid[-1]["flops"]}
            where.write_law(law)
            self.say(f"[{where.name}] loss law of {stage.name}: L(n) = {law['a']:.4g} n^-{law['b']:.4g} + "
                     f"{law['c']:.4g}")
        return {k: law[k] for k in ("a", "b", "c")}

    def growth_request(self, source: Stage, stage: Stage, previous: StageDir, where: StageDir, spec: str) -> dict:
        """The arguments of growth.grow for one growth into `stage` (the real call and the dry run's line)."""
        old, new = self.plan.shape(source), self.plan.shape(stage)
        sizes = {f: getattr(new, f) for f in ("num_layers", *WIDTH_FIELDS) if getattr(old, f) != getattr(new, f)}
        par = stage.parallel
        load, second = pair_checkpoints(previous) if source.pair else (previous.ckpt, None)
        return {"load": load, "save": where.ckpt, "spec": spec, "sizes": sizes, "second": second,
                "tp": par.get("tensor_model_parallel_size", 1), "pp": par.get("pipeline_model_parallel_size", 1),
                "fmt": self.plan.training.get("ckpt_format", "torch_dist")}

    def grow(self, source: Stage, stage: Stage, previous: StageDir, where: StageDir, spec: str) -> None:
        r = self.growth_request(source, stage, previous, where, spec)
        if self.printed is not None:
            sizes = [x for k, v in r["sizes"].items() for x in (f"--{k.replace('_', '-')}", str(v))]
            second = ["--load-second", r["second"]] if r["second"] else []
            self.printed.append(shlex.join(["megagrow", "checkpoint", "grow", "--load", r["load"], *second,
                                            "--save", r["save"], "--op", spec, *sizes, "--target-tp", str(r["tp"]),
                                            "--target-pp", str(r["pp"]), "--ckpt-format", r["fmt"], "--force",
                                            "--quiet"]))
            return
        from megagrow.growth.grow import grow
        where.make()
        old, new = self.plan.shape(source), self.plan.shape(stage)
        self.say(f"[{where.name}] growing {previous.name} ({old.num_layers} layers, hidden {old.hidden_size}) -> "
                 f"{new.num_layers} layers, hidden {new.hidden_size} with {spec}")
        # force: a growth that was killed left its output without a tracker
        grow(r["load"], r["save"], spec, r["sizes"], r["tp"], r["pp"], r["fmt"], force=True, progress=False,
             second=r["second"])

    def stage_argv(self, stage: Stage, where: StageDir, start: int, rule: StopRule, decay_iters: int | None,
                   eval_interval: int | None = None, loaded: bool = False) -> list[str]:
        """The trainer's command line for one stage; `loaded`: it starts from a checkpoint in `where.ckpt`."""
        plan, shape = self.plan, self.plan.shape(stage)
        par = {k: v for k, v in stage.parallel.items() if k != "nproc"}
        training = {k: v for k, v in {**plan.training, **stage.training}.items() if k not in _CONTROLLED}
        data = {k: v for k, v in plan.data.items() if k not in stage.training}  # a pair model's own shards
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
        argv = ["pretrain_gpt.py", "--exit-signal-handler",
                *to_argv({**plan.target, **stage.model, "kv_channels": shape.kv_channels}),
                *to_argv({**training, **schedule}), *to_argv(data), *to_argv(par),
                "--train-iters", str(plan.max_iterations()), "--save", where.ckpt,
                "--metrics-file", where.metrics_file, "--tensorboard-dir", where.tensorboard_dir,
                "--stage-stop", json.dumps(rule.as_dict()), "--stage-decision-file", where.decision_file]
        frozen = plan.frozen_layers(stage)
        if frozen:
            argv += ["--freeze-layers", layer_ranges(frozen)]
        resumed = read_tracker(where.ckpt)
        if loaded or resumed is not None:
            argv += ["--load", where.ckpt]
            if start:  # from an earlier stage's (grown) checkpoint: this stage's optimizer flags take effect
                argv.append("--override-opt_param-scheduler")
        lag = where.lag()
        if is_lag_selection(stage.grow) and (lag is None or resumed == lag["start"] + lag["k"]):
            argv.append("--eval-on-start")  # evidence that the stage goes on from the winner's state
        return argv

    def start(self, stage: Stage, where: StageDir, start: int, rule: StopRule, eval_interval: int | None,
              pid_file: str, decay_iters: int | None = None, loaded: bool = True):
        """Launch one stage's (or probe's) job step; in a dry run, print it and return its reservation."""
        argv = self.stage_argv(stage, where, start, rule, decay_iters, eval_interval, loaded)
        nproc = stage.parallel.get("nproc", 1)
        if self.printed is not None:
            name = self.launcher.step_name(where.name)
            slot = self.launcher.reserve(nproc, name)
            self.printed.append(shlex.join(self.launcher.command(nproc, argv, name, slot)))
            return slot

        def show(line: str) -> None:
            if self.progress and any(key in line for key in _SHOWN):
                print(f"[{where.name}] {line.strip()}", flush=True)
        where.make()
        step = self.launcher.start(nproc, argv, where.log, pid_file, on_line=show, name=where.name)
        self.running.add(step)
        return step

    def finished(self, step) -> None:
        if self.printed is not None:
            self.launcher.release(step)
            return
        self.running.discard(step)
        if self.interrupted:
            raise Interrupted("the running steps stopped on a signal; run the same command again to resume")

    def train(self, stage: Stage, where: StageDir, start: int, rule: StopRule, decay_iters: int | None = None,
              eval_interval: int | None = None, loaded: bool = False) -> dict:
        if self.printed is not None:
            self.finished(self.start(stage, where, start, rule, eval_interval, self.run_dir.pid_file, decay_iters,
                                     loaded))
            return {"iteration": rule.iteration}
        resumed = read_tracker(where.ckpt)
        self.say(f"[{where.name}] training {self.plan.shape(stage).num_layers} layers from iteration "
                 f"{resumed or start} until {rule.policy}" + (f" (resuming {where.ckpt})" if resumed else ""))
        step = self.start(stage, where, start, rule, eval_interval, self.run_dir.pid_file, decay_iters, loaded)
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
            raise PlanError(f"stage {where.name} failed (exit code {rc}); see {where.log}")
        self.say(f"[{where.name}] stopped at iteration {decision['iteration']}: {decision['reason']}")
        return decision


def run(plan_path: str, run_dir: str | None = None, baseline: bool = False, progress: bool = True,
        launcher: str = "auto", resources: Resources | None = None) -> dict:
    return Driver(plan_path, default_run_dir(plan_path, run_dir), progress, launcher, resources).run(baseline)


def dry_run(plan_path: str, run_dir: str | None = None, launcher: str = "auto", resources: Resources | None = None,
            baseline: bool = False) -> list[str]:
    """The lines `megagrow run` would execute (growth and launch commands), nothing written."""
    return Driver(plan_path, default_run_dir(plan_path, run_dir), False, launcher, resources).dry_run(baseline)


def default_run_dir(plan_path: str, run_dir: str | None) -> str:
    return run_dir or os.path.splitext(plan_path)[0] + "_run"
