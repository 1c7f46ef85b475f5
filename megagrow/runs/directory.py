"""A staged run's directory: the one module that knows its files and writes them atomically.

    plan.yaml                       the plan this run follows (a re-run with another plan is refused)
    step.pgid                       process group of the running job step (killed by the next driver)
    stage<i>_<name>/                one stage (StageDir):
        ckpt/                         its checkpoints (Megatron layout); its first is the grown one
        metrics.jsonl, tb/, log.txt   what the trainer logged (log.txt starts with the launch command)
        decision.json                 written once the stop rule fired and the checkpoint is saved
        lag.json                      LAG's choice of the operator into this stage
        lag/<candidate>/              one LAG probe (a StageDir of its own) and its result.json
        analysis/                     LAG analyses of the probes: lag_analysis.json, figures
    probe_<name>/law.json           the loss law fitted on a short run of a later stage's model (ecr)
    baseline/                       the target trained from scratch on the same budget (--baseline)
    report.md, report.json, *.png   the report
"""

from __future__ import annotations

import glob
import json
import os
import re

PLAN_FILE = "plan.yaml"
DECISION_FILE = "decision.json"
RESULT_FILE = "result.json"


def write_json(path: str, record: dict) -> None:
    """Write a JSON record so that readers see the old file or the whole new one, never a part."""
    with open(path + ".tmp", "w") as f:
        json.dump(record, f, indent=1)
    os.replace(path + ".tmp", path)


def read_json(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def read_metrics(path: str) -> dict[str, list[dict]]:
    """Train and validation records of one stage; a resumed stage's re-done iterations keep the last record."""
    latest: dict[tuple, dict] = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                r = json.loads(line)
                latest[(r["kind"], r["iteration"])] = r
    out = {"train": [], "valid": []}
    for (kind, _), r in sorted(latest.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        out.setdefault(kind, []).append(r)
    return out


def slug(spec: str) -> str:
    """A growth spec as a folder name."""
    return re.sub(r"[^A-Za-z0-9]+", "_", spec).strip("_")


class StageDir:
    """Where one stage, the baseline, a loss-law probe or one LAG probe lives."""

    def __init__(self, parent: str, name: str):
        self.name = name
        self.dir = os.path.join(parent, name)
        self.ckpt = os.path.join(self.dir, "ckpt")
        self.log = os.path.join(self.dir, "log.txt")
        self.metrics_file = os.path.join(self.dir, "metrics.jsonl")
        self.tensorboard_dir = os.path.join(self.dir, "tb")
        self.decision_file = os.path.join(self.dir, DECISION_FILE)
        self.pid_file = os.path.join(self.dir, "step.pgid")  # a LAG probe's own step
        self.lag_dir = os.path.join(self.dir, "lag")
        self.analysis_dir = os.path.join(self.dir, "analysis")

    def make(self) -> "StageDir":
        os.makedirs(self.dir, exist_ok=True)
        return self

    def decision(self) -> dict | None:
        return read_json(self.decision_file)

    def metrics(self) -> dict[str, list[dict]]:
        return read_metrics(self.metrics_file)

    def probe(self, spec: str) -> "StageDir":
        return StageDir(self.lag_dir, slug(spec))

    def result(self) -> dict | None:
        """A LAG probe's result.json."""
        return read_json(os.path.join(self.dir, RESULT_FILE))

    def write_result(self, record: dict) -> None:
        write_json(os.path.join(self.dir, RESULT_FILE), record)

    def lag(self) -> dict | None:
        """lag.json: LAG's choice into this stage."""
        return read_json(os.path.join(self.dir, "lag.json"))

    def write_lag(self, record: dict) -> None:
        write_json(os.path.join(self.dir, "lag.json"), record)

    def law(self) -> dict | None:
        return read_json(os.path.join(self.dir, "law.json"))

    def write_law(self, record: dict) -> None:
        write_json(os.path.join(self.dir, "law.json"), record)


class RunDir:
    def __init__(self, root: str):
        self.root = root
        self.plan_file = os.path.join(root, PLAN_FILE)
        self.pid_file = os.path.join(root, "step.pgid")
        self.report_md = os.path.join(root, "report.md")
        self.report_json = os.path.join(root, "report.json")

    def stage(self, index: int, name: str) -> StageDir:
        return StageDir(self.root, f"stage{index}_{name}")

    def baseline(self) -> StageDir:
        return StageDir(self.root, "baseline")

    def law_probe(self, stage_name: str) -> StageDir:
        return StageDir(self.root, f"probe_{stage_name}")

    def figure(self, name: str) -> str:
        return os.path.join(self.root, name)

    def read_plan_text(self) -> str | None:
        if not os.path.exists(self.plan_file):
            return None
        with open(self.plan_file) as f:
            return f.read()

    def write_plan_text(self, text: str) -> None:
        os.makedirs(self.root, exist_ok=True)
        with open(self.plan_file + ".tmp", "w") as f:
            f.write(text)
        os.replace(self.plan_file + ".tmp", self.plan_file)


def lag_dirs(path: str) -> list[str]:
    """The LAG probe folders of a run, of one stage, or the given one itself."""
    if os.path.basename(os.path.normpath(path)) == "lag":
        return [path]
    return sorted(glob.glob(os.path.join(path, "*", "lag")) + glob.glob(os.path.join(path, "lag")))


def probe_results(lag_dir: str) -> list[dict]:
    """Every probe's result.json under one LAG folder, in name order."""
    return [read_json(p) for p in sorted(glob.glob(os.path.join(lag_dir, "*", RESULT_FILE)))]
