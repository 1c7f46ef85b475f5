"""pretrain_gpt.py refuses bad input in one line, before any process group starts or anything is written,
and stops on a NaN/Inf loss or gradient norm without saving the bad state.

Argument errors are raised before megatron-core is imported, so most cases call the entry point in
process (`launch.main(argv)` returns the exit code); a few run it for real, under torchrun too.
"""

import hashlib
import math
import os
import re
import shutil
import subprocess
import sys
import types

import pytest
import yaml

from conftest import ROOT, tiny_args, pretrain_job

from megagrow.checkpoint.errors import read_tracker
from megagrow.training.launch import main


class _Validated(BaseException):
    """Raised in place of training: the flags passed validation (a case that should have failed)."""


@pytest.fixture
def in_process(monkeypatch, capsys, tmp_path):
    """Run pretrain_gpt.py's main in this process with training stubbed out: -> (exit code, stderr).

    Every run also names outputs (--save, --metrics-file, --tensorboard-dir) under an empty folder,
    which must still be empty afterwards: nothing is written before the flags are accepted."""
    def stop(args):
        raise _Validated()
    for name, attrs in (("megagrow.training.pretrain", {"pretrain": stop}),
                        ("megagrow.runtime.distributed", {"destroy": lambda: None})):
        module = types.ModuleType(name)
        module.__dict__.update(attrs)
        monkeypatch.setitem(sys.modules, name, module)
    out = tmp_path / "out"
    out.mkdir()

    def run(argv, world_size=1):
        monkeypatch.setenv("WORLD_SIZE", str(world_size))
        monkeypatch.setenv("RANK", "0")
        outputs = {"--save": out / "save", "--metrics-file": out / "m.jsonl", "--tensorboard-dir": out / "tb"}
        argv = argv + [x for flag, path in outputs.items() if flag not in argv for x in (flag, str(path))]
        capsys.readouterr()
        code = main(argv)
        err = capsys.readouterr().err
        assert os.listdir(out) == [], "written before the flags were accepted"
        return code, err
    return run


def one_line(code: int, err: str, fragment: str) -> None:
    assert code == 1, err
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith("error: ") and fragment in err, err
    assert "Traceback" not in err


@pytest.fixture(scope="module")
def bad_data(data_dir, tmp_path_factory):
    """Broken copies of the test corpus' indexed dataset, each named for what is wrong with it."""
    d = tmp_path_factory.mktemp("bad_data")
    good = f"{data_dir}/corpus_text_document"
    idx, bin_ = open(good + ".idx", "rb").read(), open(good + ".bin", "rb").read()
    for name, new_idx, new_bin in (("header", b"NOTANIDX" + idx[8:], bin_), ("short_idx", idx[:100], bin_),
                                   ("short_bin", idx, bin_[:-2]), ("long_bin", idx, bin_ + b"\0\0"),
                                   ("empty_idx", b"", bin_)):
        (d / f"{name}.idx").write_bytes(new_idx)
        (d / f"{name}.bin").write_bytes(new_bin)
    (d / "text.model").write_text("not a model\n")
    (d / "empty.model").write_bytes(b"")
    (d / "a_file").write_text("")
    (d / "a_dir").mkdir()
    return d


# (overrides of tiny_args, extra argv, world size, what the one line says). Paths: {data} the test corpus
# folder, {bad} the broken copies.
CASES = {
    # every size, count and interval positive (Megatron-LM's flag names)
    "micro-batch": ({"--micro-batch-size": "0"}, [], 1, "error: --micro-batch-size 0: must be positive"),
    "global-batch": ({"--global-batch-size": "0"}, [], 1, "--global-batch-size 0: must be positive"),
    "layers": ({"--num-layers": "0"}, [], 1, "--num-layers 0: must be positive"),
    "hidden": ({"--hidden-size": "0"}, [], 1, "--hidden-size 0: must be positive"),
    "ffn": ({"--ffn-hidden-size": "0"}, [], 1, "--ffn-hidden-size 0: must be positive"),
    "heads": ({"--num-attention-heads": "0"}, [], 1, "--num-attention-heads 0: must be positive"),
    "query-groups": ({"--num-query-groups": "0"}, [], 1, "--num-query-groups 0: must be positive"),
    "kv-channels": ({"--kv-channels": "-16"}, [], 1, "--kv-channels -16: must be positive"),
    "seq-length": ({"--seq-length": "0"}, [], 1, "--seq-length 0: must be positive"),
    "max-positions": ({"--max-position-embeddings": "0"}, [], 1, "--max-position-embeddings 0: must be positive"),
    "log-interval": ({"--log-interval": "0"}, [], 1, "--log-interval 0: must be positive"),
    "eval-interval": ({"--eval-interval": "0"}, [], 1, "--eval-interval 0: must be positive"),
    "save-interval": ({"--save-interval": "0"}, [], 1, "--save-interval 0: must be positive"),
    "eval-iters": ({"--eval-iters": "-1"}, [], 1, "--eval-iters -1: must be 0 or more"),
    "train-iters": ({"--train-iters": "0"}, [], 1, "--train-iters 0: must be positive"),
    "warmup-negative": ({"--lr-warmup-iters": "-1"}, [], 1, "--lr-warmup-iters -1: must be 0 or more"),
    "decay-iters": ({"--lr-decay-iters": "0"}, [], 1, "--lr-decay-iters 0: must be positive"),
    "exit-interval": ({"--exit-interval": "0"}, [], 1, "--exit-interval 0: must be positive"),
    "tp": ({"--tensor-model-parallel-size": "0"}, [], 1, "--tensor-model-parallel-size 0: must be positive"),
    "pp": ({"--pipeline-model-parallel-size": "-1"}, [], 1, "--pipeline-model-parallel-size -1: must be positive"),
    "lr": ({"--lr": "-1"}, [], 1, "--lr -1: must be a number in [0, inf)"),
    "lr-nan": ({"--lr": "nan"}, [], 1, "--lr nan: must be a number in [0, inf)"),
    "min-lr": ({"--min-lr": "-0.1"}, [], 1, "--min-lr -0.1: must be a number in [0, inf)"),
    "dropout": ({"--hidden-dropout": "1.5"}, [], 1, "--hidden-dropout 1.5: must be a number in [0, 1]"),
    "adam-beta2": ({"--adam-beta2": "1"}, [], 1, "--adam-beta2 1: must be a number in [0, 1)"),
    "weight-decay": ({"--weight-decay": "-0.1"}, [], 1, "--weight-decay -0.1: must be a number in [0, inf)"),
    # the LR schedule: what megatron-core's OptimizerParamScheduler would assert, said beforehand
    "warmup-train": ({"--lr-warmup-iters": "4"}, [], 1, "--lr-warmup-iters 4 must be below --train-iters 4"),
    "warmup-decay": ({"--lr-decay-iters": "2", "--lr-warmup-iters": "2"}, [], 1,
                     "--lr-warmup-iters 2 must be below --lr-decay-iters 2"),
    "warmup-init": ({"--lr-warmup-init": "1"}, [], 1, "--lr-warmup-init 1 exceeds --lr 0.003"),
    "min-lr-above": ({"--min-lr": "1"}, [], 1, "--lr 0.003 is below --min-lr 1"),
    "wsd-missing": ({"--lr-decay-style": "WSD"}, [], 1, "--lr-decay-style WSD needs --lr-wsd-decay-iters"),
    "wsd-too-long": ({"--lr-decay-style": "WSD", "--lr-wsd-decay-iters": "5"}, [], 1,
                     "--lr-wsd-decay-iters 5 exceeds --train-iters 4"),
    "wsd-samples": ({"--lr-decay-style": "WSD", "--lr-wsd-decay-samples": "33"}, [], 1,
                    "--lr-wsd-decay-samples 33 exceeds --train-iters 4 x --global-batch-size 8"),
    # parallel layout and batch
    "world-size": ({"--tensor-model-parallel-size": "2"}, [], 3, "world size 3 is not divisible by tensor (2)"),
    "batch": ({"--global-batch-size": "6"}, [], 2,
              "--global-batch-size 6 is not divisible by --micro-batch-size 2 x data-parallel size 2"),
    # the flags themselves: one line, not argparse's usage
    "not-an-int": ({"--seq-length": "sixty"}, [], 1, "argument --seq-length: invalid int value: 'sixty'"),
    "unknown-flag": ({}, ["--seq-len", "64"], 1, "unrecognized arguments: --seq-len (pretrain_gpt.py --help lists the flags)"),
    "required": ({"--lr": None}, [], 1, "the following arguments are required: --lr"),
    "eval-on-start": ({"--eval-iters": "0"}, ["--eval-on-start"], 1, "--eval-on-start needs --eval-iters above 0"),
    # --freeze-layers: 1-based layers of this model, numbers and ranges
    "freeze-beyond": ({"--freeze-layers": "2,5"}, [], 1, "--freeze-layers 2,5: layer 5 is beyond --num-layers 4"),
    "freeze-syntax": ({"--freeze-layers": "1-3;4"}, [], 1, "--freeze-layers 1-3;4: cannot read '1-3;4' (expected "
                                                           "layer numbers and ranges"),
    "freeze-empty": ({"--freeze-layers": "1,"}, [], 1, "--freeze-layers 1,: cannot read ''"),
    "freeze-zero": ({"--freeze-layers": "0-2"}, [], 1, "--freeze-layers 0-2: 0-2 is not a range of layers (they "
                                                       "count from 1)"),
    "freeze-reversed": ({"--freeze-layers": "3-1"}, [], 1, "--freeze-layers 3-1: 3-1 is not a range of layers"),
    # data: the .idx header and the .bin size megatron-core's indexed dataset reads, and the split
    "idx-header": ({"--data-path": "{bad}/header"}, [], 1, "{bad}/header.idx: not a Megatron indexed dataset index"),
    "idx-empty": ({"--data-path": "{bad}/empty_idx"}, [], 1, "{bad}/empty_idx.idx: not a Megatron indexed dataset"),
    "idx-truncated": ({"--data-path": "{bad}/short_idx"}, [], 1, "{bad}/short_idx.idx: truncated (100 bytes"),
    "bin-short": ({"--data-path": "{bad}/short_bin"}, [], 1, "{bad}/short_bin.bin: {bin-2} bytes, but short_bin.idx "
                                                            "describes {bin}"),
    "bin-long": ({"--data-path": "{bad}/long_bin"}, [], 1, "{bad}/long_bin.bin: {bin+2} bytes, but long_bin.idx"),
    "blend-bad-part": ({"--data-path": None}, ["--data-path", "0.5", "{data}/corpus_text_document", "0.5",
                                               "{bad}/short_bin"], 1, "{bad}/short_bin.bin: {bin-2} bytes"),
    "blend-odd": ({"--data-path": None}, ["--data-path", "0.5", "{data}/corpus_text_document", "0.5"], 1,
                  "expected prefixes, or weights and prefixes in turn"),
    "blend-weight": ({"--data-path": None}, ["--data-path", "-1", "{data}/corpus_text_document", "1",
                                             "{data}/corpus_text_document"], 1,
                     "--data-path: weight -1 must be positive"),
    "data-missing": ({"--data-path": "{bad}/nothing"}, [], 1, "data path not found: {bad}/nothing"),
    "split-no-train": ({"--split": "0,1,0"}, [], 1, "--split 0,1,0 leaves no training split"),
    "split-no-valid": ({"--split": "90,0,10"}, [], 1, "--split 90,0,10 leaves no validation split"),
    "split-zero": ({"--split": "0,0,0"}, [], 1, "--split 0,0,0: expected up to 3 weights"),
    "split-empty-test": ({"--split": "969,30,1"}, [], 1, "--split 969,30,1 leaves the test split of"),
    # the tokenizer model is loaded by sentencepiece at argument time (cheap)
    "tokenizer-text": ({"--tokenizer-model": "{bad}/text.model"}, [], 1,
                       "--tokenizer-model {bad}/text.model: not a sentencepiece model"),
    "tokenizer-empty": ({"--tokenizer-model": "{bad}/empty.model"}, [], 1,
                        "--tokenizer-model {bad}/empty.model: not a sentencepiece model (an empty file)"),
    "tokenizer-missing": ({"--tokenizer-model": "{bad}/none.model"}, [], 1, "tokenizer model not found"),
    # outputs
    "save-file": ({"--save": "{bad}/a_file"}, [], 1, "--save {bad}/a_file: exists and is not a directory"),
    "save-under-file": ({"--save": "{bad}/a_file/ckpt"}, [], 1,
                        "--save {bad}/a_file/ckpt: cannot be created ({bad}/a_file is a file)"),
    "metrics-dir": ({"--metrics-file": "{bad}/a_dir"}, [], 1, "--metrics-file {bad}/a_dir: exists and is not a file"),
    "tensorboard-file": ({"--tensorboard-dir": "{bad}/a_file"}, [], 1,
                         "--tensorboard-dir {bad}/a_file: exists and is not a directory"),
}


def _fill(text, data_dir, bad):
    if not isinstance(text, str):
        return text
    size = os.path.getsize(f"{data_dir}/corpus_text_document.bin")
    for key, value in (("{data}", data_dir), ("{bad}", bad), ("{bin}", size), ("{bin-2}", size - 2),
                       ("{bin+2}", size + 2)):
        text = text.replace(key, str(value))
    return text


@pytest.mark.parametrize("name", CASES)
def test_bad_flag_is_one_line(data_dir, bad_data, in_process, name):
    overrides, extra, world_size, message = CASES[name]
    overrides = {k: _fill(v, data_dir, bad_data) for k, v in overrides.items()}
    argv = tiny_args(data_dir, **overrides) + [_fill(x, data_dir, bad_data) for x in extra]
    one_line(*in_process(argv, world_size), _fill(message, data_dir, bad_data))


def test_good_flags_pass(data_dir, in_process):
    """The table's base flags are valid (each case fails for its own reason), blends included."""
    with pytest.raises(_Validated):
        in_process(tiny_args(data_dir))
    with pytest.raises(_Validated):
        prefix = f"{data_dir}/corpus_text_document"
        in_process(tiny_args(data_dir, **{"--data-path": None}) + ["--data-path", "0.3", prefix, "0.7", prefix])


def _subprocess(argv):
    env = {**os.environ, "WORLD_SIZE": "1", "RANK": "0"}
    return subprocess.run([sys.executable, "pretrain_gpt.py", *argv], cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=60)


@pytest.mark.parametrize("flag,value", [("--seq-length", "0"), ("--micro-batch-size", "0"),
                                        ("--num-attention-heads", "0"), ("--log-interval", "0")])
def test_bad_flag_for_real(data_dir, flag, value):
    """Those that used to die of a signal (--seq-length 0) or in a traceback, as real processes."""
    out = _subprocess(tiny_args(data_dir, **{flag: value}))
    one_line(out.returncode, out.stderr, f"error: {flag} {value}: must be positive")


def _torchrun_one_line(run, fragment: str) -> None:
    """Exit non-zero, the line once (rank 0 says what every rank found), no rank's traceback (torchrun
    reports its failed workers after them, in a block of its own), no rank left behind."""
    assert run.returncode != 0, run.output[-3000:]
    lines = [line for line in run.output.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and fragment in lines[0], run.output[-3000:]
    ranks = run.output.split("torch/distributed/elastic")[0].replace(lines[0], "")
    for sign in ("Traceback", "EOFError", "Connection closed", "megagrow-error-rank"):
        assert sign not in ranks, run.output[-3000:]


def test_bad_flag_under_torchrun(data_dir, tmp_path):
    run = pretrain_job(2, tiny_args(data_dir, **{"--seq-length": "0"}), tmp_path / "m.jsonl", timeout=120, real=True)
    _torchrun_one_line(run, "--seq-length 0: must be positive")


# ---- --load of a damaged checkpoint: every rank finds it the same way before any rank loads ----

def _digest(root) -> dict[str, str]:
    return {os.path.relpath(os.path.join(d, f), root): hashlib.sha256(open(os.path.join(d, f), "rb").read()).hexdigest()
            for d, _, files in os.walk(root) for f in files}


@pytest.fixture(scope="module")
def checkpoints(data_dir, tmp_path_factory):
    """One tiny TP=2 checkpoint per format, written by the trainer: {format: (root, digest)}."""
    d = tmp_path_factory.mktemp("ckpt")
    found = {}
    for fmt in ("torch_dist", "torch"):
        flags = {"--tensor-model-parallel-size": "2", "--train-iters": "2", "--eval-iters": "0",
                 "--save": str(d / fmt), "--ckpt-format": fmt}
        run = pretrain_job(2, tiny_args(data_dir, **flags), d / f"{fmt}.jsonl")
        assert run.returncode == 0, run.output[-3000:]
        found[fmt] = (d / fmt, _digest(d / fmt))
    return found


def _truncate(path) -> None:
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


# (format, the damage to the copy, what the line says)
DAMAGE = {
    "dist-truncated-shard": ("torch_dist", lambda it: _truncate(max(it.glob("*.distcp"))),
                             r"iter_0000002: truncated shard file __\d+_\d+\.distcp \(\d+ bytes, needs \d+\)"),
    # megatron-core 0.19 keeps the common state in the .distcp files, earlier releases (and megagrow's
    # converter) in common.pt, which is then read first
    "dist-empty-common": ("torch_dist", lambda it: (it / "common.pt").write_bytes(b""),
                          r"iter_0000002: .*(common\.pt|metadata)"),
    "torch-truncated-shard": ("torch", lambda it: _truncate(it / "mp_rank_01" / "model_optim_rng.pt"),
                              r"unreadable shard iter_0000002/mp_rank_01/model_optim_rng\.pt"),
    "torch-empty-shard": ("torch", lambda it: (it / "mp_rank_01" / "model_optim_rng.pt").write_bytes(b""),
                          r"unreadable shard iter_0000002/mp_rank_01/model_optim_rng\.pt"),
}


@pytest.mark.parametrize("name", DAMAGE)
def test_damaged_checkpoint_is_one_line_on_every_rank(data_dir, checkpoints, tmp_path, name):
    fmt, damage, pattern = DAMAGE[name]
    source, digest = checkpoints[fmt]
    copy = tmp_path / "copy"
    shutil.copytree(source, copy)
    damage(copy / "iter_0000002")
    damaged = _digest(copy)
    flags = {"--tensor-model-parallel-size": "2", "--train-iters": "4", "--ckpt-format": fmt,
             "--load": str(copy), "--save": str(copy)}
    run = pretrain_job(2, tiny_args(data_dir, **flags), tmp_path / "m.jsonl", timeout=120)
    _torchrun_one_line(run, f"error: --load {copy}: ")
    line = next(line for line in run.output.splitlines() if line.startswith("error: "))
    assert re.search(pattern, line), line
    assert _digest(copy) == damaged and _digest(source) == digest  # nothing written, the source untouched
    assert not os.path.exists(tmp_path / "m.jsonl")


# ---- NaN/Inf: Megatron-LM's --check-for-nan-in-loss-and-grad (on unless --no-check-for-nan-in-loss-and-grad) ----

# On the tiny model an LR of 1e30 overflows for real: iteration 1 trains at the warmup's LR 0,
# iteration 2's update makes the weights ~1e30, iteration 3's attention scores overflow to NaN.
DIVERGING = {"--lr": "1e30", "--train-iters": "6", "--eval-iters": "0"}


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(data_dir, tmp_path):
    save = tmp_path / "ckpt"
    flags = {**DIVERGING, "--save": str(save), "--save-interval": "1", "--exit-interval": "3"}
    run = pretrain_job(2, tiny_args(data_dir, **flags), tmp_path / "m.jsonl", timeout=240)
    _torchrun_one_line(run, "error: iteration 3: ")
    line = next(line for line in run.output.splitlines() if line.startswith("error: "))
    assert re.fullmatch(r"error: iteration 3: (loss|grad norm) is (nan|inf), stopped before saving it "
                        r"\(--no-check-for-nan-in-loss-and-grad disables this check\); the newest checkpoint, "
                        + re.escape(str(save / "iter_0000002")) + ", is the last good one", line), line
    assert read_tracker(str(save)) == 2  # neither the interval nor the exit save of iteration 3
    assert sorted(os.listdir(save)) == ["iter_0000001", "iter_0000002", "latest_checkpointed_iteration.txt"]
    assert sorted(run.losses()) == [1, 2]  # the bad iteration is not recorded either


def test_no_check_for_nan_trains_on(data_dir, tmp_path):
    flags = {**DIVERGING, "--train-iters": "4"}
    run = pretrain_job(1, tiny_args(data_dir, **flags) + ["--no-check-for-nan-in-loss-and-grad"], tmp_path / "m.jsonl")
    assert run.returncode == 0, run.output[-3000:]
    losses = run.losses()
    assert sorted(losses) == [1, 2, 3, 4] and not math.isfinite(losses[3])  # NaN (or Inf) from iteration 3 on


def test_a_diverged_stage_fails_the_staged_run_without_growing(data_dir, tmp_path):
    from megagrow.scheduling.plan import Plan, Stage
    target = {"num_layers": 4, "hidden_size": 64, "num_attention_heads": 4, "group_query_attention": True,
              "num_query_groups": 2, "swiglu": True, "normalization": "RMSNorm", "position_embedding_type": "rope",
              "untie_embeddings_and_output_weights": True, "hidden_dropout": 0.0, "attention_dropout": 0.0}
    training = {"global_batch_size": 8, "micro_batch_size": 2, "seq_length": 64, "lr": 1e30, "lr_warmup_iters": 1,
                "log_interval": 1, "eval_interval": 1000, "eval_iters": 1, "save_interval": 1, "seed": 1234}
    data = {"data_path": f"{data_dir}/corpus_text_document", "tokenizer_type": "GPTSentencePieceTokenizer",
            "tokenizer_model": f"{data_dir}/tok.model", "split": "90,5,5", "data_cache_path": f"{data_dir}/cache"}
    stages = [Stage("2l", model={"num_layers": 2}, stop={"policy": "iters", "iteration": 6}, parallel={"nproc": 1}),
              Stage("4l", grow={"op": "stack:g=2"}, stop={"policy": "flops"}, parallel={"nproc": 1})]
    plan = Plan(target, {}, training, data, stages, vocab_size=1024)
    plan.budget = {"flops": 8 * plan.step_flops(stages[1])}
    with open(tmp_path / "plan.yaml", "w") as f:
        yaml.safe_dump({**{k: v for k, v in vars(plan).items() if k != "stages"},
                        "stages": [vars(s) for s in stages]}, f)
    out = subprocess.run([sys.executable, "-m", "megagrow.cli", "run", str(tmp_path / "plan.yaml"), "--output",
                          str(tmp_path / "run")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, out.stdout + out.stderr
    assert re.fullmatch(r"error: stage stage0_2l failed \(exit code 1\); see \S+\n", out.stderr), out.stderr
    assert "growing" not in out.stdout
    log = open(out.stderr.split("see ")[1].strip()).read()
    assert "error: iteration 3: " in log
    assert read_tracker(str(tmp_path / "run" / "stage0_2l" / "ckpt")) == 2
    assert [n for n in os.listdir(tmp_path / "run") if n.startswith("stage")] == ["stage0_2l"]  # nothing grown
