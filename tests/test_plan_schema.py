"""Malformed plans fail `megagrow run` and `megagrow run --dry-run` at once, in one line naming the key path,
before anything is written under --output."""

import copy
import time

import pytest
import yaml

from megagrow.cli import main
from megagrow.scheduling.plan import Plan, Stage, dump_plan


def base_plan() -> dict:
    target = {"num_layers": 4, "hidden_size": 64, "num_attention_heads": 4, "swiglu": True}
    stages = [Stage("2l", model={"num_layers": 2}, stop={"policy": "iters", "iteration": 4}, parallel={"nproc": 2}),
              Stage("4l", grow={"op": "stack:g=2"}, stop={"policy": "flops"}, lr={"schedule": "rewarm"},
                    parallel={"nproc": 2, "tensor_model_parallel_size": 2})]
    plan = Plan(target, {}, {"global_batch_size": 8, "micro_batch_size": 2, "seq_length": 32, "lr": 1e-3},
                {"tokenizer_type": "NullTokenizer", "vocab_size": 512}, stages, vocab_size=512)
    plan.budget = {"flops": 4 * plan.step_flops(stages[0]) + 4 * plan.step_flops()}
    return yaml.safe_load(dump_plan(plan))


def _set(path: str, value):
    def change(raw):
        *keys, last = path.split(".")
        node = raw
        for k in keys:
            node = node[int(k)] if k.isdigit() else node[k]
        node[int(last) if last.isdigit() else last] = value
    return change


def _delete(path: str):
    def change(raw):
        *keys, last = path.split(".")
        node = raw
        for k in keys:
            node = node[int(k)] if k.isdigit() else node[k]
        del node[last]
    return change


CASES = [
    (_set("targt", {}), "targt: unknown key"),
    (_set("target.hiden_size", 64), "target.hiden_size: not a Megatron-LM flag"),
    (_set("training.globl_batch_size", 8), "training.globl_batch_size: not a Megatron-LM flag"),
    (_set("data.tokenizer_typ", "NullTokenizer"), "data.tokenizer_typ: not a Megatron-LM flag"),
    (_set("stages.1.lrr", {}), "stages[1].lrr: unknown key; expected one of name, model"),
    (_set("stages.1.lr.schedul", "rewarm"), "stages[1].lr.schedul: unknown key; expected one of schedule, warmup_iters"),
    (_set("stages.0.stop.iteraton", 4), "stages[0].stop.iteraton: unknown key"),
    (_set("stages.1.grow.opp", "stack:g=2"), "stages[1].grow.opp: unknown key"),
    (_set("stages.1.parallel.tensor_parallel", 2), "stages[1].parallel.tensor_parallel: not a Megatron-LM flag"),
    (_set("stages.1.model", {"num_layer": 4}), "stages[1].model.num_layer: not a Megatron-LM flag"),
    (_set("training.lr", "fast"), "training.lr: expected"),
    (_set("stages.0.parallel.nproc", "two"), "stages[0].parallel.nproc: expected an integer"),
    (_set("target.num_layers", 4.5), "target.num_layers: expected an integer"),
    (_set("stages.1.lr.schedule", "rewarn"), "stages[1].lr.schedule: 'rewarn' is not one of"),
    (_set("stages.1.grow.op", "stak:g=2"), "stages[1].grow.op: unknown operator"),
    (_set("stages.0.stop.policy", "never"), "stages[0].stop.policy: unknown stop rule 'never'"),
    (_set("stages.1.parallel.tensor_model_parallel_size", 3), "stages[1].parallel.tensor_model_parallel_size: 3 does"),
    (_set("stages.1.grow.op", "stack:g=4"), "stages[1].grow.op:"),
    (_set("stages", []), "stages: the plan has no stages"),
    (_delete("stages.1.grow"), "stages[1].grow: missing"),
    (_set("stages.1.stop.policy", "iters"), "stages[1].stop"),
    (_set("data.tokenizer_type", "MagicTokenizer"), "data.tokenizer_type: 'MagicTokenizer' is not one of"),
    (_set("stages.1.grow", {"select": "lag", "k": 4, "candidates": ["stack:g=2", "interp:g=2"]}),
     "stages[1].grow.candidates[1]: unknown operator"),
]


@pytest.mark.parametrize("dry", [True, False], ids=["dry-run", "run"])
@pytest.mark.parametrize("change,needle", CASES, ids=[c[1].split(":")[0] for c in CASES])
def test_malformed_plan_fails_in_one_line_before_anything_is_written(tmp_path, capsys, change, needle, dry):
    raw = base_plan()
    change(raw)
    path, out = tmp_path / "plan.yaml", tmp_path / "out"
    path.write_text(yaml.safe_dump(raw))
    t0 = time.time()
    rc = main(["run", str(path), "--output", str(out), "--quiet"] + (["--dry-run"] if dry else []))
    seconds = time.time() - t0
    err = capsys.readouterr().err.strip()
    assert rc == 1 and err.startswith("error: ") and "\n" not in err, err
    assert needle in err, err
    assert seconds < 2, seconds
    assert not out.exists()


def test_good_plan_and_old_lag_form(tmp_path, capsys):
    raw = base_plan()
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["run", str(path), "--output", str(tmp_path / "out"), "--dry-run"]) == 0
    assert "checkpoint grow" in capsys.readouterr().out and not (tmp_path / "out").exists()
    old = copy.deepcopy(raw)
    old["stages"][1]["grow"] = {"op": "lag:k=2", "candidates": ["stack:g=2", "interpolate:g=2"], "space": False}
    path.write_text(yaml.safe_dump(old))
    from megagrow.scheduling.plan import load_plan
    grow = load_plan(str(path)).stages[1].grow
    assert grow == {"select": "lag", "k": 2, "candidates": ["stack:g=2", "interpolate:g=2"], "space": False}
    assert main(["run", str(path), "--output", str(tmp_path / "out"), "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert sum("--op interpolate:g=2" in line for line in lines) == 1 and "--eval-on-start" in lines[-1]
