"""Bad plans fail `megagrow run` and `megagrow run --dry-run` at once, before stage 0 starts, in one line
naming the key path (and the stage), with nothing written under --output: mistakes in the plan's text
(scheduling.schema) and those only the machine shows (scheduling.preflight: data and tokenizer files, the
trainer's own checks of each stage's flags, room in the launcher). Bad `megagrow plan` invocations too."""

import copy
import os
import shutil
import time

import pytest
import yaml

from conftest import write_indexed, write_tokenizer
from megagrow.cli import main
import megagrow.scheduling.driver  # noqa: E402,F401  (imported at collection: the timed cases time checks only)
import megagrow.scheduling.preflight  # noqa: E402,F401
from megagrow.scheduling.plan import Plan, Stage, dump_plan

DATA = "@DATA@"  # the test's data folder, filled in when the plan is written


def base_plan() -> dict:
    target = {"num_layers": 4, "hidden_size": 64, "num_attention_heads": 4, "swiglu": True}
    stages = [Stage("2l", model={"num_layers": 2}, stop={"policy": "iters", "iteration": 4}, parallel={"nproc": 2}),
              Stage("4l", grow={"op": "stack:g=2"}, stop={"policy": "flops"}, lr={"schedule": "rewarm"},
                    parallel={"nproc": 2, "tensor_model_parallel_size": 2})]
    plan = Plan(target, {}, {"global_batch_size": 8, "micro_batch_size": 2, "seq_length": 32, "lr": 1e-3},
                {"data_path": f"{DATA}/corpus_text_document", "tokenizer_type": "NullTokenizer", "vocab_size": 512},
                stages, vocab_size=512)
    plan.budget = {"flops": 4 * plan.step_flops(stages[0]) + 4 * plan.step_flops()}
    return yaml.safe_load(dump_plan(plan))


@pytest.fixture(scope="session")
def tokenizer_model(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tokenizer") / "tok.model"
    write_tokenizer(path)
    return str(path)


@pytest.fixture
def data(tmp_path, tokenizer_model):
    """A data folder: an indexed dataset, a tokenizer model, a prefix with its .bin only, a prefix whose .idx
    is not an index, a file that is not a sentencepiece model."""
    d = tmp_path / "data"
    d.mkdir()
    write_indexed(d / "corpus_text_document")
    shutil.copy(tokenizer_model, d / "tok.model")
    (d / "half.bin").write_bytes(b"")
    (d / "bad.bin").write_bytes(b"")
    (d / "bad.idx").write_bytes(b"not an index")
    (d / "text.model").write_text("not a sentencepiece model")
    return d


def write_plan(raw, tmp_path, data) -> str:
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(raw).replace(DATA, str(data)))
    return str(path)


def _node(raw, keys):
    for k in keys:
        raw = raw[int(k)] if k.isdigit() else raw[k]
    return raw


def _set(path: str, value):
    def change(raw):
        *keys, last = path.split(".")
        _node(raw, keys)[int(last) if last.isdigit() else last] = copy.deepcopy(value)
    return change


def _update(path: str, values: dict):
    def change(raw):
        _node(raw, path.split(".")).update(copy.deepcopy(values))
    return change


def _delete(path: str):
    def change(raw):
        *keys, last = path.split(".")
        del _node(raw, keys)[last]
    return change


def _all(*changes):
    def change(raw):
        for c in changes:
            c(raw)
    return change


LAG = {"select": "lag", "k": 4, "candidates": ["stack:g=2", "interpolate:g=2"], "space": False}
PREFIX = f"{DATA}/corpus_text_document"

CASES = [
    # the plan's keys and types
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
    (_set("training.train_samples", 64), "training.train_samples: a plan counts iterations"),
    (_set("stages.0.parallel.nproc", "two"), "stages[0].parallel.nproc: expected an integer"),
    (_set("target.num_layers", 4.5), "target.num_layers: expected an integer"),
    (_set("stages.1.lr.schedule", "rewarn"), "stages[1].lr.schedule: 'rewarn' is not one of"),
    (_set("stages.0.stop.policy", "never"), "stages[0].stop.policy: unknown stop rule 'never'"),
    (_set("stages", []), "stages: the plan has no stages"),
    (_delete("stages.1.grow"), "stages[1].grow: missing"),
    (_set("stages.1.stop.policy", "iters"), "stages[1].stop"),
    (_set("data.tokenizer_type", "MagicTokenizer"), "data.tokenizer_type: 'MagicTokenizer' is not one of"),
    (_set("stages.0.stop", {}), "stages[0].stop.policy: missing"),
    (_set("stages.0.stop", {"iteration": 4}), "stages[0].stop.policy: missing"),
    (_set("stages.0.stop", None), "stages[0].stop: expected a mapping, got None"),
    (_set("stages.1.stop", None), "stages[1].stop: expected a mapping, got None"),
    (_set("stages.0.model", [2]), "stages[0].model: expected a mapping"),
    (_set("stages.0.model", None), "stages[0].model: expected a mapping, got None"),
    (_set("stages.1.parallel", "tp2"), "stages[1].parallel: expected a mapping"),
    (_set("stages.1.parallel", None), "stages[1].parallel: expected a mapping, got None"),
    (_set("stages.0.stop.iteration", "four"), "stages[0].stop.iteration: expected an integer"),
    (_set("stages.0.stop.iteration", 0), "stages[0].stop.iteration: 0 is not after iteration 0"),
    (_set("stages.0.stop", {"policy": "converge", "window": 1, "max_iteration": 8}),
     "stages[0].stop.window: must be at least 2"),
    (_set("stages.0.stop", {"policy": "ecr", "law": {"a": 1}}), "stages[0].stop.law: expected {a: number"),
    (_set("stages.0.name", "two/layers"), "stages[0].name: 'two/layers' is not a folder name"),
    (_set("stages.1.name", "2l"), "stages[1].name: '2l' names an earlier stage"),
    (_set("budget.flops", 0), "budget.flops: must be positive"),
    (_set("vocab_size", 0), "vocab_size: must be at least 1"),
    (_set("training.micro_batch_size", 0), "training.micro_batch_size: must be at least 1"),
    (_set("training.tensor_model_parallel_size", 2), "training.tensor_model_parallel_size: set it in a stage's "
     "parallel"),
    (_set("training.num_layers", 2), "training.num_layers: set it in target or a stage's model"),
    (_set("stages.0.model.num_layers", 0), "stages[0].model.num_layers: must be at least 1"),
    # shapes and layouts megatron-core refuses
    (_set("stages.1.parallel.tensor_model_parallel_size", 3),
     "stages[1].parallel.tensor_model_parallel_size: 3 does not divide the stage's num_attention_heads 4"),
    (_update("target", {"group_query_attention": True, "num_query_groups": 1}),
     "stages[1].parallel.tensor_model_parallel_size: 2 does not divide the stage's num_query_groups 1"),
    (_set("target.ffn_hidden_size", 129),
     "stages[1].parallel.tensor_model_parallel_size: 2 does not divide the stage's ffn_hidden_size 129"),
    (_set("stages.1.parallel.pipeline_model_parallel_size", 3),
     "stages[1].parallel.pipeline_model_parallel_size: 3 does not divide the stage's 4 layers"),
    (_set("stages.1.parallel.nproc", 3), "stages[1].parallel.nproc: 3 processes are not a multiple of TP x PP = 2"),
    (_set("stages.1.parallel.nproc", 0), "stages[1].parallel.nproc: must be at least 1"),
    (_set("stages.1.parallel.tensor_model_parallel_size", 0),
     "stages[1].parallel.tensor_model_parallel_size: must be at least 1"),
    (_set("target.num_attention_heads", 3), "target.num_attention_heads: 3 does not divide the stage's hidden_size 64"),
    (_update("target", {"group_query_attention": True, "num_query_groups": 3}),
     "target.num_query_groups: 3 does not divide the stage's num_attention_heads 4"),
    # the trainer's own checks of a stage's flags (training.arguments.validate_args, world size = nproc)
    (_set("stages.0.parallel.nproc", 3), "stages[0].parallel.nproc: --global-batch-size 8 is not divisible by "
     "--micro-batch-size 2 x data-parallel size 3"),
    (_set("training.lr_decay_style", "WSD"), "training.lr_decay_style: --lr-decay-style WSD needs"),
    (_set("training.min_lr", 0.5), "--lr 0.001 is below --min-lr 0.5 (in stages[0], 2l)"),
    (_update("training", {"bf16": True, "fp16": True}), "--bf16 and --fp16 are mutually exclusive (in stages[0]"),
    (_update("training", {"ckpt_format": "torch", "use_distributed_optimizer": True}),
     "--ckpt-format torch with --use-distributed-optimizer is not supported"),
    (_set("target.max_position_embeddings", 16), "--seq-length 32 exceeds --max-position-embeddings 16"),
    # data and tokenizer files, where the stages run
    (_delete("data.data_path"), "data.data_path: missing"),
    (_set("data.data_path", f"{DATA}/nothing"), "data.data_path: @DATA@/nothing: .bin and .idx not found"),
    (_set("data.data_path", [f"{DATA}/half"]), "/data/half: .idx not found"),
    (_set("data.data_path", ["0.5", PREFIX, "0.5", f"{DATA}/nothing"]), "/data/nothing: .bin and .idx not found"),
    (_set("data.data_path", ["0.5", PREFIX, "0.5"]), "data.data_path: --data-path 0.5 "),
    (_set("data.data_path", ["half", PREFIX]), "data.data_path: half: .bin and .idx not found (relative to"),
    (_set("data.data_path", [f"{DATA}/bad"]), "data.data_path: @DATA@/bad.idx: not a Megatron indexed dataset index"),
    (_set("data.split", "1,0,0"), "data.split: --split 1,0,0 leaves no validation split to evaluate on"),
    (_update("data", {"tokenizer_type": "GPTSentencePieceTokenizer", "tokenizer_model": f"{DATA}/text.model"}),
     "data.tokenizer_model: --tokenizer-model @DATA@/text.model: not a sentencepiece model"),
    (_set("stages.1.lr", {"schedule": "rewarm", "warmup_iters": 20}),
     "stages[1].lr.warmup_iters: --lr-warmup-iters 20 must be below --lr-decay-iters 4"),
    (_set("data.data_path", "no/such/corpus"), "data.data_path: no/such/corpus: .bin and .idx not found (relative to"),
    (_set("training.eval_interval", 0), "training.eval_interval: must be at least 1"),
    (_update("data", {"tokenizer_type": "GPTSentencePieceTokenizer", "tokenizer_model": f"{DATA}/missing.model"}),
     "data.tokenizer_model: @DATA@/missing.model not found"),
    (_set("data.tokenizer_type", "GPTSentencePieceTokenizer"), "data.tokenizer_model: missing"),
    (_delete("data.vocab_size"), "data.vocab_size: missing (NullTokenizer needs --vocab-size)"),
    # growth operators that do not exist or do not connect one stage's shape to the next
    (_set("stages.1.grow.op", "stak:g=2"), "stages[1].grow.op: unknown operator"),
    (_set("stages.1.grow.op", "stak:g=4"), "stages[1].grow.op: unknown operator 'stak'"),
    (_set("stages.1.grow.op", "stack:g=4"), "stages[1].grow.op: stack:g=4 makes 8 layers"),
    (_set("stages.1.grow.op", "interpolate:g=3"), "stages[1].grow.op: interpolate:g=3 makes 6 layers"),
    (_set("stages.1.grow.op", "fpi"), "stages[1].grow.op: --op fpi grows width, not depth"),
    (_set("stages.0.model", {"num_layers": 2, "hidden_size": 32}), "stages[1].grow.op: grow depth"),
    (_set("stages.1.grow", {**LAG, "candidates": ["stack:g=2", "interp:g=2"]}),
     "stages[1].grow.candidates[1]: unknown operator"),
    (_set("stages.1.grow", {**LAG, "k": 0}), "stages[1].grow.k: must be at least 1"),
    (_all(_set("stages.0.model.num_layers", 1), _set("stages.1.grow", {"select": "lag", "k": 4})),
     "stages[1].grow.space: LAG's design space needs 0 < L' - L <= L"),
    (_set("stages.1.grow", {**LAG, "parallel": {"nproc": 3, "tensor_model_parallel_size": 3}}),
     "stages[1].grow.parallel.tensor_model_parallel_size: 3 does not divide"),
    (_set("stages.1.grow", {**LAG, "parallel": {"nproc": 3}}),
     "stages[1].grow.parallel.nproc: --global-batch-size 8 is not divisible"),
    # which layers a stage trains: all, new (what the depth growth into it made) or a list
    (_set("stages.1.trainable", "old"), "stages[1].trainable: expected all, new or a list of layer numbers, got 'old'"),
    (_set("stages.1.trainable", [1, 5]), "stages[1].trainable: 5 is not one of the stage's layers 1..4"),
    (_set("stages.1.trainable", [True]), "stages[1].trainable: True is not one of the stage's layers 1..4"),
    (_set("stages.0.trainable", "new"), "stages[0].trainable: new needs a depth growth into the stage that makes "
     "new layers (the first stage grows from nothing)"),
    (_all(_set("stages.1.grow", LAG), _set("stages.1.trainable", "new")),
     "stages[1].trainable: new needs a depth growth into the stage that makes new layers (LAG chooses"),
    (_all(_set("stages.0.model", {"hidden_size": 32}), _set("stages.1.grow.op", "direct"),
          _set("stages.1.trainable", "new")), "(direct grows width)"),
    (_all(_set("stages.1.grow.op", "learn:steps=2"), _set("stages.1.trainable", "new")),
     "(learn:steps=2 mixes old layers into every one)"),
    (_set("training.freeze_layers", "1"), "training.freeze_layers: a stage says which layers train with `trainable`"),
]


def _id(case) -> str:
    return case[1].split(":")[0].split(" (")[0][:40]


def run_cli(argv, capsys):
    """megagrow in-process: (exit code, stderr stripped, seconds)."""
    t0 = time.time()
    rc = main(argv)
    seconds = time.time() - t0
    captured = capsys.readouterr()
    return rc, captured.err.strip(), seconds


def assert_one_line(rc, err, needle):
    assert rc == 1, (rc, err)
    assert err.startswith("error: ") and "\n" not in err, err
    assert "Traceback" not in err and "unexpected" not in err and "traceback in" not in err, err
    assert needle in err, err


@pytest.mark.parametrize("dry", [True, False], ids=["dry-run", "run"])
@pytest.mark.parametrize("change,needle", CASES, ids=[_id(c) for c in CASES])
def test_bad_plan_fails_in_one_line_before_anything_is_written(tmp_path, data, capsys, change, needle, dry):
    raw = base_plan()
    change(raw)
    path, out = write_plan(raw, tmp_path, data), tmp_path / "out"
    rc, err, seconds = run_cli(["run", path, "--output", str(out), "--quiet"] + (["--dry-run"] if dry else []),
                               capsys)
    assert_one_line(rc, err, needle.replace(DATA, str(data)))
    assert seconds < 2, seconds  # checked, not started: no process group, no training
    assert not out.exists()


def test_case_table_covers_each_class():
    assert len(CASES) >= 40


@pytest.mark.parametrize("dry", [True, False], ids=["dry-run", "run"])
def test_a_step_the_launcher_has_no_room_for_fails_before_stage0(tmp_path, data, capsys, dry):
    """SLURM with 1 node of 2 ranks: stage 1's 4 processes need 2 nodes; said before stage 0 trains."""
    raw = base_plan()
    raw["stages"][1]["parallel"]["nproc"] = 4
    path, out = write_plan(raw, tmp_path, data), tmp_path / "out"
    rc, err, _ = run_cli(["run", path, "--output", str(out), "--launcher", "slurm", "--nodes", "1",
                          "--nproc-per-node", "2"] + (["--dry-run"] if dry else []), capsys)
    assert_one_line(rc, err, "stages[1].parallel.nproc: stage1_4l: needs 2 nodes of 2 processes")
    assert not out.exists()


@pytest.mark.parametrize("dry", [True, False], ids=["dry-run", "run"])
def test_a_baseline_that_could_not_start_fails_before_stage0(tmp_path, data, capsys, dry):
    """--baseline: the target from scratch decays its LR over the budget's 6 target iterations; a warmup of 7
    suits the stages (8 iterations in all) but not it."""
    raw = base_plan()
    raw["training"]["lr_warmup_iters"] = 7
    raw["stages"][1]["lr"] = {"schedule": "continue"}
    path, out = write_plan(raw, tmp_path, data), tmp_path / "out"
    assert main(["run", path, "--output", str(out), "--dry-run"]) == 0  # without the baseline
    capsys.readouterr()
    rc, err, _ = run_cli(["run", path, "--output", str(out), "--baseline"] + (["--dry-run"] if dry else []), capsys)
    assert_one_line(rc, err, "training.lr_warmup_iters: --lr-warmup-iters 7 must be below --lr-decay-iters 6")
    assert err.endswith("(in the --baseline run of the target)") and not out.exists()


def test_good_plan_passes_the_preflight_and_old_lag_form(tmp_path, data, capsys):
    raw = base_plan()
    path = write_plan(raw, tmp_path, data)
    assert main(["run", path, "--output", str(tmp_path / "out"), "--dry-run"]) == 0
    assert "checkpoint grow" in capsys.readouterr().out and not (tmp_path / "out").exists()
    old = copy.deepcopy(raw)
    old["stages"][1]["grow"] = {"op": "lag:k=2", "candidates": ["stack:g=2", "interpolate:g=2"], "space": False}
    path = write_plan(old, tmp_path, data)
    from megagrow.scheduling.plan import load_plan
    grow = load_plan(path).stages[1].grow
    assert grow == {"select": "lag", "k": 2, "candidates": ["stack:g=2", "interpolate:g=2"], "space": False}
    assert main(["run", path, "--output", str(tmp_path / "out"), "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert sum("--op interpolate:g=2" in line for line in lines) == 1 and "--eval-on-start" in lines[-1]


def test_good_plan_passes_the_run_preflight_and_claims_its_directory(tmp_path, data, capsys):
    """The real run's path (Driver.prepare) with a sentencepiece tokenizer file, a blend, GQA and an ecr stage:
    checked, then the run directory holds the plan; nothing is started here."""
    from megagrow.scheduling.driver import Driver
    raw = base_plan()
    raw["data"] = {"data_path": ["0.7", PREFIX, "0.3", PREFIX], "tokenizer_type": "GPTSentencePieceTokenizer",
                   "tokenizer_model": f"{DATA}/tok.model"}
    raw["target"].update(group_query_attention=True, num_query_groups=2)
    raw["stages"][0]["stop"] = {"policy": "ecr", "max_iteration": 8, "probe_iters": 4}
    path = write_plan(raw, tmp_path, data)
    driver = Driver(path, str(tmp_path / "out"), progress=False)
    driver.prepare()
    assert os.listdir(tmp_path / "out") == ["plan.yaml"]
    assert main(["run", path, "--output", str(tmp_path / "dry"), "--dry-run", "--launcher", "slurm", "--nodes", "1",
                 "--nproc-per-node", "2"]) == 0
    assert "srun" in capsys.readouterr().out and not (tmp_path / "dry").exists()


PLAN = ["plan", "--train-tokens", "1e14", "--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4",
        "--seq-length", "32", "--global-batch-size", "8", "--vocab-size", "512"]

PLAN_CASES = [
    (["--output", "@TMP@/no/such/folder/plan.yaml"], "plan: --output @TMP@/no/such/folder/plan.yaml: the folder"),
    (["--output", "@TMP@"], "plan: --output @TMP@ is a directory"),
    (["--policy", "converge", "--policy-options", "{window: 4}"], "plan: --policy-options is not JSON"),
    (["--policy", "converge", "--policy-options", "[4]"], "plan: --policy-options must be a JSON object"),
    (["--policy", "converge", "--policy-options", '{"windw": 4}'], "stages[0].stop.windw: unknown key"),
    (["--policy", "ecr", "--policy-options", '{"window": "4"}'], "stages[0].stop.window: expected an integer"),
    (["--nproc", "0"], "plan: --nproc must be at least 1"),
    (["--lag", "0"], "plan: --lag must be at least 1"),
    (["--lag-groups", "0"], "plan: --lag-groups must be at least 1"),
    (["--max-small-fraction", "1.5"], "plan: --max-small-fraction must be in (0, 1]"),
    (["--budget-flops=-1e20"], "plan: --budget-flops must be positive"),
    (["--nproc", "3", "--tensor-model-parallel-size", "2"], "stages[0].parallel.nproc: 3 processes are not a multiple"),
    (["--tensor-model-parallel-size", "3"], "stages[0].parallel.tensor_model_parallel_size: 3 does not divide"),
    (["--tokenizer-model", "@TMP@/missing.model"], "plan: tokenizer model not found: @TMP@/missing.model (--tokenizer-model)"),
    (["--tokenizer-model", "@TMP@/plan.yaml.bad"], "plan: --tokenizer-model @TMP@/plan.yaml.bad: not a sentencepiece"),
    (["--num-layerz", "3"], "unrecognized arguments: --num-layerz"),
]


@pytest.mark.parametrize("extra,needle", PLAN_CASES, ids=[c[1].split(":")[0] + " " + c[0][-1][:12] for c in PLAN_CASES])
def test_bad_plan_command_fails_in_one_line_and_writes_nothing(tmp_path, capsys, extra, needle):
    (tmp_path / "plan.yaml.bad").write_text("not a model")
    argv = [a.replace("@TMP@", str(tmp_path)) for a in PLAN + extra]
    if any(a.startswith("--budget-flops") for a in extra):
        argv.remove("--train-tokens")
        argv.remove("1e14")
    if "--output" not in extra:
        argv += ["--output", str(tmp_path / "plan.yaml")]
    if "--tokenizer-model" in extra:
        argv.remove("--vocab-size")
        argv.remove("512")
    rc, err, _ = run_cli(argv, capsys)
    assert_one_line(rc, err, needle.replace("@TMP@", str(tmp_path)))
    assert sorted(os.listdir(tmp_path)) == ["plan.yaml.bad"]


def test_good_plan_command_writes_a_plan_that_passes_the_preflight(tmp_path, data, capsys):
    path = str(tmp_path / "plan.yaml")
    assert main(PLAN[:-2] + ["--tokenizer-type", "NullTokenizer", "--vocab-size", "512", "--data-path",
                             f"{data}/corpus_text_document", "--output", path, "--nproc", "2"]) == 0
    assert capsys.readouterr().err == ""
    assert main(["run", path, "--output", str(tmp_path / "out"), "--dry-run"]) == 0
    assert not (tmp_path / "out").exists()
