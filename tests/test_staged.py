"""`megagrow run PLAN`: a 3-stage CPU run (2 -> 4 -> 8 layers, a different TP/PP/DP per stage), killed and resumed."""

import json
import os
import signal
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT

from megagrow.scheduling.plan import Plan, Stage


def staged_plan(data_dir, path) -> str:
    target = {"num_layers": 8, "hidden_size": 64, "num_attention_heads": 4, "group_query_attention": True,
              "num_query_groups": 2, "swiglu": True, "normalization": "RMSNorm", "position_embedding_type": "rope",
              "untie_embeddings_and_output_weights": True, "hidden_dropout": 0.0, "attention_dropout": 0.0}
    training = {"global_batch_size": 8, "micro_batch_size": 2, "seq_length": 64, "lr": 3e-3, "min_lr": 3e-4,
                "lr_decay_style": "cosine", "lr_warmup_iters": 2, "log_interval": 1, "eval_interval": 4,
                "eval_iters": 2, "save_interval": 4, "seed": 1234}
    data = {"data_path": f"{data_dir}/corpus_text_document", "tokenizer_type": "GPTSentencePieceTokenizer",
            "tokenizer_model": f"{data_dir}/tok.model", "split": "90,5,5", "data_cache_path": f"{data_dir}/cache"}
    stages = [Stage("2l", model={"num_layers": 2}, stop={"policy": "iters", "iteration": 8}, parallel={"nproc": 2}),
              Stage("4l", model={"num_layers": 4}, grow={"op": "stack:g=2"}, stop={"policy": "iters", "iteration": 16},
                    lr={"schedule": "rewarm", "warmup_iters": 1},
                    parallel={"tensor_model_parallel_size": 2, "nproc": 2}),
              Stage("8l", grow={"op": "stack:g=2"}, stop={"policy": "flops"},
                    parallel={"pipeline_model_parallel_size": 2, "nproc": 2})]
    plan = Plan(target, {}, training, data, stages, vocab_size=1024)
    plan.budget = {"flops": sum(8 * plan.step_flops(s) for s in stages)}
    with open(path, "w") as f:
        yaml.safe_dump({**{k: v for k, v in vars(plan).items() if k != "stages"},
                        "stages": [vars(s) for s in stages]}, f)
    return str(path)


def megagrow_run(plan, out, *extra):
    return subprocess.Popen([sys.executable, "-m", "megagrow.cli", "run", plan, "--output", str(out), *extra],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def dry_run_launches(plan, out, *extra) -> list[str]:
    """The launch lines `megagrow run --dry-run` prints (comments and growth commands left out); it writes nothing."""
    out_dir = os.path.join(str(out))
    proc = subprocess.run([sys.executable, "-m", "megagrow.cli", "run", plan, "--output", out_dir, "--dry-run", *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert not os.path.exists(out_dir)
    lines = proc.stdout.splitlines()
    assert any(line.startswith("megagrow checkpoint grow --load") for line in lines)
    return sorted(line for line in lines if line and not line.startswith(("#", "megagrow checkpoint grow")))


def launched(run_dir) -> list[str]:
    """Every command the run's launcher executed: the first line of each job step's log."""
    found = []
    for d, _, files in os.walk(run_dir):
        if "log.txt" in files:
            found += [line[2:].rstrip("\n") for line in open(os.path.join(d, "log.txt")) if line.startswith("$ ")]
    return sorted(found)


def final(run_dir) -> dict:
    with open(os.path.join(run_dir, "report.json")) as f:
        return json.load(f)


@pytest.mark.slow
def test_three_stage_run_grows_twice_and_survives_a_kill(data_dir, tmp_path):
    plan = staged_plan(data_dir, tmp_path / "plan.yaml")
    planned = dry_run_launches(plan, tmp_path / "whole")
    whole = megagrow_run(plan, tmp_path / "whole")
    output = whole.communicate(timeout=600)[0]
    assert whole.returncode == 0, output[-3000:]
    assert launched(tmp_path / "whole") == planned and len(planned) == 3  # the dry run printed what ran
    assert "growing stage0_2l (2 layers" in output and "growing stage1_4l (4 layers" in output
    report = final(tmp_path / "whole")
    stages = report["stages"]
    assert [s["decision"]["iteration"] for s in stages] == [8, 16, 24]
    losses = [s["final_valid_loss"] for s in stages]
    assert losses[0] > losses[1] > losses[2], losses  # the loss keeps falling across both growths
    assert os.path.exists(tmp_path / "whole" / "loss_vs_flops.png")
    # The data order continues: stage 2's first iteration reads the samples after stage 1's last.
    metrics = tmp_path / "whole" / "stage1_4l" / "metrics.jsonl"
    first = next(r for r in map(json.loads, open(metrics)) if r["kind"] == "train")
    assert first["iteration"] == 9 and first["consumed_samples"] == 9 * 8
    log = open(tmp_path / "whole" / "stage1_4l" / "log.txt").read()
    assert "LR schedule restarted at iteration 8" in log and "loaded checkpoint" in log

    # SIGKILL the driver while stage 2 trains, then run the same command again.
    killed = megagrow_run(plan, tmp_path / "killed")
    for line in killed.stdout:
        if line.startswith("[stage1_4l]") and "iteration       13/" in line:
            killed.send_signal(signal.SIGKILL)
            break
    killed.wait(timeout=60)
    assert killed.returncode == -signal.SIGKILL
    assert not os.path.exists(tmp_path / "killed" / "stage1_4l" / "decision.json")
    again = megagrow_run(plan, tmp_path / "killed")
    output = again.communicate(timeout=600)[0]
    assert again.returncode == 0, output[-3000:]
    assert "[stage0_2l] done earlier" in output and "resuming" in output
    assert "growing stage0_2l" not in output
    resumed = final(tmp_path / "killed")["stages"]
    assert [s["decision"]["iteration"] for s in resumed] == [8, 16, 24]
    assert resumed[-1]["final_valid_loss"] == pytest.approx(losses[-1], abs=1e-5)


@pytest.mark.slow
def test_ecr_stage_fits_the_large_model_law_on_a_probe(data_dir, tmp_path):
    path = staged_plan(data_dir, tmp_path / "plan.yaml")
    raw = yaml.safe_load(open(path))
    raw["stages"] = raw["stages"][:2]
    raw["target"]["num_layers"] = 4
    raw["training"]["eval_interval"] = 2
    raw["stages"][0]["stop"] = {"policy": "ecr", "probe_iters": 10, "window": 3, "max_iteration": 12}
    raw["stages"][1]["stop"] = {"policy": "flops"}
    plan = Plan(**{**raw, "stages": [Stage(**s) for s in raw["stages"]]})
    raw["budget"] = {"flops": 12 * plan.step_flops(plan.stages[0]) + 6 * plan.step_flops(plan.stages[1])}
    yaml.safe_dump(raw, open(path, "w"))
    proc = megagrow_run(path, tmp_path / "ecr")
    output = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, output[-3000:]
    law = json.load(open(tmp_path / "ecr" / "probe_4l" / "law.json"))
    assert law["a"] > 0 and law["b"] > 0 and "loss law of 4l" in output
    decision = json.load(open(tmp_path / "ecr" / "stage0_2l" / "decision.json"))
    assert decision["policy"] == "ecr" and decision["iteration"] <= 12
    evidence = decision["evidence"]  # the rate and its threshold are kept even when max_iteration ended it
    assert "E" in evidence and "law" in evidence and evidence["threshold"] < 1
    if "last iteration" not in decision["reason"]:
        assert evidence["E"] < evidence["threshold"]
    assert final(tmp_path / "ecr")["stages"][1]["decision"]["reason"].startswith("flops")
