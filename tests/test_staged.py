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
    data = {"data_path": f"{data_dir}/corpus_text_document", "tokenizer_type": "SentencePieceTokenizer",
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


def final(run_dir) -> dict:
    with open(os.path.join(run_dir, "report.json")) as f:
        return json.load(f)


@pytest.mark.slow
def test_three_stage_run_grows_twice_and_survives_a_kill(data_dir, tmp_path):
    plan = staged_plan(data_dir, tmp_path / "plan.yaml")
    whole = megagrow_run(plan, tmp_path / "whole")
    output = whole.communicate(timeout=600)[0]
    assert whole.returncode == 0, output[-3000:]
    assert "growing stage0_2l (2 layers" in output and "growing stage1_4l (4 layers" in output
    report = final(tmp_path / "whole")
    stages = report["stages"]
    assert [s["decision"]["iteration"] for s in stages] == [8, 16, 24]
    losses = [s["final_valid_loss"] for s in stages]
    assert losses[0] > losses[1] > losses[2], losses  # the loss keeps falling across both growths
    assert os.path.exists(tmp_path / "whole" / "loss_vs_flops.png")
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
