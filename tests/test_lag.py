"""LAG probing at a stage boundary: 4 candidates, 2 groups of 2 processes (2 waves), a probe killed, a driver
killed; the analysis; a study."""

import json
import os
import signal
import time

import pytest
import yaml

from conftest import tiny_args, pretrain_job
from test_checkpoint import megagrow
from test_staged import final, megagrow_run, staged_plan

from megagrow.lag.probe import candidates, design_space
from megagrow.runs.directory import slug
from megagrow.scheduling.plan import Plan, Stage

SPECS = ["lag:p=1,b=1,init=dup", "lag:p=1,b=2,init=dup", "lag:p=1,b=1,init=random", "lag:p=1,b=2,init=random"]


def test_design_space():
    assert sorted(design_space(2, 4)) == sorted(SPECS)
    assert len(design_space(6, 9)) == 4 * 2 * 2  # p in 1..4, b in {1, 3}, two inits
    assert candidates({"op": "lag:k=5", "candidates": ["stack:g=2"], "space": "dup"}, 4, 8)[0] == "stack:g=2"


def lag_plan(data_dir, tmp_path) -> str:
    path = staged_plan(data_dir, tmp_path / "plan.yaml")
    raw = yaml.safe_load(open(path))
    raw["target"]["num_layers"] = 4
    raw["training"]["eval_interval"] = 2
    raw["stages"] = raw["stages"][:2]
    raw["stages"][0]["stop"] = {"policy": "iters", "iteration": 6}
    raw["stages"][1].update(grow={"op": "lag:k=4", "space": True, "groups": 2, "time_limit": 300},
                            stop={"policy": "flops"}, parallel={"nproc": 2})
    plan = Plan(**{**raw, "stages": [Stage(**s) for s in raw["stages"]]})
    raw["budget"] = {"flops": 6 * plan.step_flops(plan.stages[0]) + 8 * plan.step_flops(plan.stages[1])}
    yaml.safe_dump(raw, open(path, "w"))
    return path


def results(run_dir):
    lag = os.path.join(run_dir, "stage1_4l", "lag")
    return {s: json.load(open(os.path.join(lag, slug(s), "result.json"))) for s in SPECS
            if os.path.exists(os.path.join(lag, slug(s), "result.json"))}


@pytest.mark.slow
def test_lag_study_trains_every_candidate_to_the_end(data_dir, tmp_path):
    src = tmp_path / "src"
    run = pretrain_job(1, tiny_args(data_dir, **{"--num-layers": "2", "--train-iters": "4", "--save": str(src)}),
                   tmp_path / "src.jsonl")
    assert run.returncode == 0, run.output
    out = megagrow("lag", "study", "--load", str(src), "--num-layers", "3", "--steps", "6", "--output",
                   str(tmp_path / "study"), "--groups", "2", "--eval-interval", "2")
    s = json.load(open(tmp_path / "study" / "study" / "analysis" / "lag_analysis.json"))
    assert sorted(s["specs"]) == sorted(design_space(2, 3)) and s["steps"] == [2, 4, 6]
    assert s["regret"][-1] == 0 and s["recall_at_k"]["1"][-1] == 1  # at the end, the choice is the best
    assert "ordering settles" in out.stdout


@pytest.mark.slow
def test_lag_survives_a_killed_probe_and_a_killed_driver(data_dir, tmp_path):
    plan = lag_plan(data_dir, tmp_path)
    run_dir = tmp_path / "run"
    lag = run_dir / "stage1_4l" / "lag"
    proc = megagrow_run(plan, run_dir)
    victim = lag / slug(SPECS[0]) / "step.pgid"
    killed_probe = killed_driver = False
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.3)
        if not killed_probe and victim.exists() and (lag / slug(SPECS[0]) / "metrics.jsonl").exists():
            os.killpg(int(victim.read_text()), signal.SIGKILL)
            killed_probe = True
        if killed_probe and any(r["status"] == "done" for r in results(run_dir).values()):
            proc.send_signal(signal.SIGKILL)
            killed_driver = True
            break
    output = proc.communicate()[0]
    assert killed_probe and killed_driver, output[-3000:]
    assert "FAILED" in output and SPECS[0] in output
    before = {s: r for s, r in results(run_dir).items() if r["status"] == "done"}
    assert before and not (run_dir / "stage1_4l" / "lag.json").exists()
    again = megagrow_run(plan, run_dir)
    output = again.communicate(timeout=900)[0]
    assert again.returncode == 0, output[-3000:]
    assert "finished earlier" in output
    after = results(run_dir)
    for s, r in before.items():
        assert after[s] == r  # reused, not re-run
    assert after[SPECS[0]]["status"] == "failed"
    lag_record = json.load(open(run_dir / "stage1_4l" / "lag.json"))
    assert SPECS[0] in lag_record["failed"] and lag_record["winner"] != SPECS[0]
    done = {s: r for s, r in after.items() if r["status"] == "done"}
    best = min(done, key=lambda s: done[s]["curve"][-1][1])
    assert lag_record["winner"] == best and f"picked {best}" in output
    # Every probe read the same batches: the same first sample after the growth at iteration 6.
    for s in done:
        first = next(r for r in map(json.loads, open(lag / slug(s) / "metrics.jsonl")) if r["kind"] == "train")
        assert first["iteration"] == 7 and first["consumed_samples"] == 7 * 8
    # The stage went on from the winner's state: its evaluation on start gives the probe's last loss.
    records = [json.loads(line) for line in open(run_dir / "stage1_4l" / "metrics.jsonl")]
    at_start = [r["lm loss"] for r in records if r["kind"] == "valid" and r["iteration"] == 10]
    assert len(at_start) == 2 and at_start[0] == at_start[1] == done[best]["curve"][-1][1]
    assert final(run_dir)["stages"][1]["decision"]["reason"].startswith("flops")
    # megagrow lag analyze: the surviving probes' curves against their last step.
    out = megagrow("lag", "analyze", str(run_dir))
    analysis = json.load(open(run_dir / "stage1_4l" / "analysis" / "lag_analysis.json"))
    assert analysis["final_best"] == best and analysis["steps"] == [2, 4] and "settles" in out.stdout
    assert (run_dir / "stage1_4l" / "analysis" / "self_correlation.png").exists()
