"""Staged runs and LAG probes as srun job steps under a real SLURM (started here, see slurm_cluster.py)."""

import json
import subprocess
import sys
import time

import pytest
import yaml

from conftest import ROOT
from slurm_cluster import LocalSlurm, ensure_installed
from test_staged import dry_run_launches, launched, staged_plan

from megagrow.scheduling.plan import Plan, Stage


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    why = ensure_installed()
    if why:
        pytest.skip(why)
    cluster = LocalSlurm(str(tmp_path_factory.mktemp("slurm")))
    cluster.start()
    yield cluster
    cluster.stop()


def slurm_plan(data_dir, tmp_path, stage0_iters: int) -> str:
    path = staged_plan(data_dir, tmp_path / "plan.yaml")
    raw = yaml.safe_load(open(path))
    raw["target"]["num_layers"] = 4
    raw["training"].update(eval_interval=2, save_interval=2)
    raw["stages"] = raw["stages"][:2]
    raw["stages"][0].update(stop={"policy": "iters", "iteration": stage0_iters}, parallel={"nproc": 2})
    raw["stages"][1].update(grow={"op": "lag:k=4", "candidates": ["stack:g=2", "interpolate:g=2"], "space": False,
                                  "groups": 2}, stop={"policy": "flops"}, parallel={"nproc": 1}, lr={})
    plan = Plan(**{**raw, "stages": [Stage(**s) for s in raw["stages"]]})
    # 4 iterations of the target pay for the losing probe (LAG@4), 8 train on after it
    raw["budget"] = {"flops": stage0_iters * plan.step_flops(plan.stages[0]) + 12 * plan.step_flops(plan.stages[1])}
    yaml.safe_dump(raw, open(path, "w"))
    return path


def batch_script(tmp_path, plan: str, run_dir) -> str:
    script = tmp_path / "run.sbatch"
    script.write_text(f"""#!/bin/bash
#SBATCH --nodes=2 --ntasks-per-node=1 --cpus-per-task=2 --job-name=megagrow-test
#SBATCH --output={tmp_path}/job-%j.out
cd {ROOT}
exec {sys.executable} -m megagrow.cli run {plan} --output {run_dir} --launcher slurm
""")
    return str(script)


@pytest.mark.slow
def test_staged_run_and_lag_probes_as_job_steps(slurm, data_dir, tmp_path):
    run_dir = tmp_path / "run"
    plan = slurm_plan(data_dir, tmp_path, 6)
    # Outside the allocation, the shape given by flags: the lines must be the ones srun runs inside it.
    planned = dry_run_launches(plan, run_dir, "--launcher", "slurm", "--nodes", "2", "--cpus-per-node", "2")
    job = slurm.sbatch(batch_script(tmp_path, plan, run_dir))
    state = slurm.wait(job)
    log = open(tmp_path / f"job-{job}.out").read()
    assert state == "COMPLETED", log[-3000:]
    assert launched(run_dir) == planned and len(planned) == 4, (launched(run_dir), planned)
    report = json.load(open(run_dir / "report.json"))
    assert [s["decision"]["iteration"] for s in report["stages"]] == [6, 14]
    assert "DP 2" in open(run_dir / "stage0_2l" / "log.txt").read()  # 2 nodes x 1 rank, one data-parallel job
    probes = [json.load(open(p)) for p in (run_dir / "stage1_4l" / "lag").glob("*/result.json")]
    assert len(probes) == 2 and all(p["status"] == "done" for p in probes)
    assert max(p["started"] for p in probes) < min(p["ended"] for p in probes)  # the two steps overlapped
    assert "picked" in log


@pytest.mark.slow
def test_scancel_leaves_a_resumable_stage(slurm, data_dir, tmp_path):
    run_dir = tmp_path / "run"
    script = batch_script(tmp_path, slurm_plan(data_dir, tmp_path, 40), run_dir)
    job = slurm.sbatch(script)
    metrics = run_dir / "stage0_2l" / "metrics.jsonl"
    end = time.time() + 300
    while time.time() < end and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 6):
        time.sleep(0.3)
    # SIGTERM to the stage's job step (its tasks), as the driver passes on `--signal=B:USR1@T` before a time limit.
    steps = subprocess.run(["squeue", "-h", "-s", "-j", job, "-o", "%i %j"], env=slurm.env, capture_output=True,
                           text=True).stdout.split("\n")
    step = next(line.split()[0] for line in steps if "megagrow-stage0_2l" in line)
    subprocess.run(["scancel", "--signal=TERM", step], env=slurm.env, check=True)
    slurm.wait(job)
    log = open(tmp_path / f"job-{job}.out").read()
    assert "on a signal" in open(run_dir / "stage0_2l" / "log.txt").read(), log[-2000:]
    assert (run_dir / "stage0_2l" / "ckpt" / "latest_checkpointed_iteration.txt").exists()
    assert not (run_dir / "stage0_2l" / "decision.json").exists()
    job = slurm.sbatch(script)  # resubmitted: resumes and finishes
    state = slurm.wait(job)
    log = open(tmp_path / f"job-{job}.out").read()
    assert state == "COMPLETED" and "resuming" in log, log[-3000:]
    report = json.load(open(run_dir / "report.json"))
    assert [s["decision"]["iteration"] for s in report["stages"]] == [40, 48]
