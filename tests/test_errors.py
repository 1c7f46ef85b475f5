"""Bad launches fail fast with one line on stderr and a non-zero exit."""

import os
import subprocess
import sys

import pytest

from conftest import ROOT, tiny_args


def launch(argv, world_size=1):
    env = {**os.environ, "WORLD_SIZE": str(world_size), "RANK": "0"}
    return subprocess.run([sys.executable, "pretrain_gpt.py", *argv], cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=60)


@pytest.mark.parametrize("overrides,world_size,message", [
    ({"--data-path": "/nonexistent/corpus"}, 1, "data path not found: /nonexistent/corpus"),
    ({"--tokenizer-model": "/nonexistent/tok.model"}, 1, "tokenizer model not found: /nonexistent/tok.model"),
    ({"--hidden-size": "66"}, 1, "--hidden-size 66 is not divisible by --num-attention-heads 4"),
    ({"--tensor-model-parallel-size": "8"}, 8, "--num-attention-heads 4 is not divisible by --tensor-model-parallel-size 8"),
    ({"--pipeline-model-parallel-size": "3"}, 3, "--num-layers 4 is not divisible by --pipeline-model-parallel-size 3"),
    ({"--global-batch-size": "6"}, 2, "--global-batch-size 6 is not divisible by --micro-batch-size 2 x data-parallel size 2"),
    ({"--num-query-groups": "3"}, 1, "--num-attention-heads 4 is not divisible by --num-query-groups 3"),
    ({"--tensor-model-parallel-size": "3"}, 2, "world size 2 is not divisible by tensor (3) x pipeline (1)"),
])
def test_bad_arguments(data_dir, overrides, world_size, message):
    out = launch(tiny_args(data_dir, **overrides), world_size)
    assert out.returncode == 1
    assert out.stderr.strip().count("\n") == 0, out.stderr
    assert message in out.stderr


def test_load_of_a_non_checkpoint(data_dir, tmp_path):
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    out = launch(tiny_args(data_dir, **{"--load": str(tmp_path)}))
    assert out.returncode == 1
    assert out.stderr.strip() == f"error: --load {tmp_path}: not a checkpoint directory " \
                                 "(no latest_checkpointed_iteration.txt)"


TOOL_CASES = [
    (["tools/preprocess_data.py", "--input", "{tmp}/nope.jsonl", "--output-prefix", "{tmp}/out/x",
      "--tokenizer-type", "GPTSentencePieceTokenizer", "--tokenizer-model", "{data}/tok.model"], "input not found"),
    (["tools/preprocess_data.py", "--input", "{data}/corpus.jsonl", "--output-prefix", "{tmp}/out/x",
      "--tokenizer-type", "GPTSentencePieceTokenizer", "--tokenizer-model", "{tmp}/text.model"],
     "not a sentencepiece model"),
    (["tools/preprocess_data.py", "--input", "{data}/corpus.jsonl", "--output-prefix", "{tmp}/out/x",
      "--tokenizer-type", "GPTSentencePieceTokenizer"], "needs a tokenizer model"),
    (["tools/preprocess_data.py", "--input", "{tmp}/text.model", "--output-prefix", "{tmp}/out/x",
      "--tokenizer-type", "GPTSentencePieceTokenizer", "--tokenizer-model", "{data}/tok.model"], "text.model:1"),
    (["tools/train_tokenizer.py", "--input", "{tmp}/nope.jsonl", "--model-prefix", "{tmp}/out/tok"],
     "input not found"),
    (["tools/train_tokenizer.py", "--input", "{tmp}/text.model", "--model-prefix", "{tmp}/out/tok"], "text.model:1"),
    (["tools/prepare_stdlib_corpus.py", "--output", "/proc/megagrow/corpus.jsonl", "--max-bytes", "1000"],
     "/proc/megagrow"),
    (["tools/checkpoint_inspect.py", "{tmp}/nope"], "no such directory"),
    (["tools/checkpoint_convert.py", "--load", "{tmp}/nope", "--save", "{tmp}/out/c"], "no such directory"),
]


@pytest.mark.parametrize("argv,fragment", TOOL_CASES, ids=[f"{c[0][0][6:-3]}-{i}" for i, c in enumerate(TOOL_CASES)])
def test_tools_fail_in_one_line(data_dir, tmp_path, argv, fragment):
    (tmp_path / "text.model").write_text("not a sentencepiece model, nor JSON lines")
    argv = [a.format(tmp=tmp_path, data=data_dir) for a in argv]
    out = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    assert fragment in lines[0] and "Traceback" not in out.stderr and "unexpected" not in lines[0], lines[0]
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")


def test_a_closed_pipe_ends_quietly(tmp_path):
    """`megagrow ... | head`: the reader leaves early; the command stops without an error line (exit 141)."""
    proc = subprocess.Popen([sys.executable, "-m", "megagrow.cli", "plan", "--train-tokens", "2e12", "--num-layers",
                             "32", "--hidden-size", "4096", "--num-attention-heads", "32", "--seq-length", "4096",
                             "--global-batch-size", "1024", "--vocab-size", "32000"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # before it writes: its first write meets a closed pipe
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 141 and err == "", err
