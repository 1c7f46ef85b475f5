"""pretrain_gpt.py's flags are Megatron-LM's: the same names, dests, defaults and choices as Megatron-LM's own
parser (tests/fixtures/megatron_lm_flags.json, read from its argparse parser at core_v0.16.1 and from
megatron-core 0.19.2's megatron/training), every flag megagrow defines is read somewhere, and a Megatron-LM
flag megagrow does not act on is refused by name, never dropped."""

import ast
import json
import math
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT, tiny_args

TODAY = "Megatron-LM core_v0.19.2"
# Where megagrow's flag deliberately differs from Megatron-LM's, and why.
DIFFERENCES = {
    "--distributed-backend": "default: nccl with CUDA, gloo without (Megatron-LM: nccl, which cannot run on a CPU)",
    "--transformer-impl": "default: Transformer Engine when it is installed and CUDA is there, else local",
    "--eval-interval": "default 1000 (Megatron-LM's None fails in its own sample count unless given)",
    "--attention-backend": "megagrow keeps the choice's name; Megatron-LM parses it into AttnBackend",
    "--dist-ckpt-optim-fully-reshardable": "one dest with --dist-ckpt-optim-sharding, which also offers dp_reshardable",
    "--ckpt-format": "torch_dcp and fsdp_dtensor are not written by megagrow (refused by choice)",
    "--optimizer": "adam and sgd only (muon, lion, soap: refused by choice)",
    "--position-embedding-type": "learned_absolute and rope (yarn, mrope, relative, none: refused by choice)",
    "--tokenizer-type": "the GPT tokenizers (BERT, multimodal and SFT ones: refused by choice)",
}
NO_OPS = {"deprecated_use_mcore_models": "--use-mcore-models is a no-op in Megatron-LM too"}


def _table():
    with open(os.path.join(ROOT, "tests", "fixtures", "megatron_lm_flags.json")) as f:
        return json.load(f)


def _ours():
    from megagrow.training.arguments import build_parser
    return {s: a for a in build_parser()._actions for s in a.option_strings if s not in ("-h", "--help")}


def _jsonable(value):
    try:
        json.dumps(value)
        return value
    except TypeError:
        return repr(value)


def test_same_names_defaults_and_choices_as_megatron_lm():
    theirs = _table()[TODAY]
    mismatched = []
    for flag, action in _ours().items():
        if flag not in theirs or flag in DIFFERENCES:
            continue
        t = theirs[flag]
        ours = {"dest": action.dest, "default": _jsonable(action.default),
                "choices": sorted(map(str, action.choices)) if action.choices else None, "nargs": action.nargs}
        wanted = {"dest": t["dest"], "default": t["default"],
                  "choices": sorted(map(str, t["choices"])) if t["choices"] else None, "nargs": t["nargs"]}
        if ours["nargs"] in ("+", "*") and wanted["nargs"] in ("+", "*"):
            ours["nargs"] = wanted["nargs"]  # one or more against none or more: both read the same lists
        if ours != wanted:
            mismatched.append((flag, ours, wanted))
    assert not mismatched, mismatched
    megagrow_only = sorted(f for f in _ours() if f not in theirs and f not in _table()["Megatron-LM core_v0.16.1"])
    assert megagrow_only == ["--dist-ckpt-optim-sharding", "--eval-on-start", "--freeze-layers", "--growth-plan",
                             "--metrics-file", "--restart-lr-schedule-at", "--stage-decision-file", "--stage-stop"], \
        megagrow_only


def test_the_shipped_flag_list_is_the_table():
    from megagrow.training.arguments import megatron_lm_flags
    table = _table()
    assert megatron_lm_flags() == set().union(*(set(t) for t in table.values())) - {"-h", "--help"}


def _names_read(tree) -> set[str]:
    """Attribute names and string constants a module reads (not the dest= of its own add_argument calls)."""
    declared = {id(kw.value) for node in ast.walk(tree) if isinstance(node, ast.Call)
                for kw in node.keywords if kw.arg == "dest"}
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in declared:
            names.add(node.value)
    return names


def test_every_flag_is_read_somewhere():
    read = set()
    for folder, _, files in os.walk(os.path.join(ROOT, "megagrow")):
        for name in files:
            if name.endswith(".py"):
                with open(os.path.join(folder, name)) as f:
                    read |= _names_read(ast.parse(f.read()))
    unread = sorted({a.dest for a in _ours().values()} - read - set(NO_OPS))
    assert not unread, f"flags defined but never read: {unread}"


def _launch(argv):
    env = {**os.environ, "WORLD_SIZE": "1", "RANK": "0"}
    return subprocess.run([sys.executable, "pretrain_gpt.py", *argv], cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=60)


def test_a_megatron_lm_flag_not_acted_on_is_named(data_dir):
    out = _launch(tiny_args(data_dir) + ["--moe-router-topk", "2", "--num-experts", "4", "--bogus-flag"])
    assert out.returncode == 1
    assert out.stderr.strip() == ("error: --moe-router-topk, --num-experts: Megatron-LM flags megagrow does not act "
                                  "on yet (docs/megatron-lm-flags.md); unrecognized arguments: --bogus-flag "
                                  "(pretrain_gpt.py --help lists the flags)"), out.stderr


# Megatron-LM's examples/llama/train_llama3_8b_h100_fp8.sh (core_v0.16.1), its mock-data branch, flag for flag:
# sizes shrunk to a CPU model (8 GPUs -> 2 processes), nothing else removed. Its "--split '99,1,0'" reaches
# Megatron-LM with the quotes (bash does not strip quotes inside an array element): written as meant.
LLAMA3_8B_FP8 = """
--use-mcore-models --num-layers 2 --hidden-size 64 --ffn-hidden-size 224 --num-attention-heads 4
--group-query-attention --num-query-groups 2 --kv-channels 16 --seq-length 64 --max-position-embeddings 64
--position-embedding-type rope --rotary-base 1000000 --rotary-percent 1.0 --attention-dropout 0.0
--hidden-dropout 0.0 --swiglu --init-method-std 0.0134 --attention-backend fused --apply-layernorm-1p
--untie-embeddings-and-output-weights --disable-bias-linear
--micro-batch-size 1 --global-batch-size 8 --train-samples 50 --lr-decay-samples 44 --lr-warmup-samples 8
--lr 0.00015 --min-lr 0.00001 --decoupled-lr 5.0e-4 --decoupled-min-lr 4.5e-5 --lr-decay-style cosine
--clip-grad 1.0 --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --bf16 --grad-reduce-in-bf16
--cross-entropy-loss-fusion --calculate-per-token-loss --manual-gc --empty-unused-memory-level 1
--exit-duration-in-mins 235
--use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather
--fp8-format hybrid --fp8-amax-history-len 1024 --fp8-amax-compute-algo max --fp8-param-gather
--tensor-model-parallel-size 1 --context-parallel-size 1 --sequence-parallel
--mock-data --tokenizer-type NullTokenizer --vocab-size 1000 --data-cache-path {tmp}/cache --tiktoken-pattern v2
--split 99,1,0 --no-create-attention-mask-in-dataloader --no-mmap-bin-files --num-workers 1
--log-interval 1 --eval-iters 2 --eval-interval 3 --save-interval 4 --log-throughput --profile
--profile-step-start 1 --profile-step-end 2 --ckpt-format torch_dist --distributed-timeout-minutes 60
--save {tmp}/ckpt --load {tmp}/ckpt --tensorboard-dir {tmp}/tb
"""
# What this machine (no GPU, no Transformer Engine) must refuse of it, each by name.
LLAMA3_REFUSED = {"--attention-backend", "--fp8-format", "--fp8-amax-history-len", "--fp8-amax-compute-algo",
                  "--fp8-param-gather", "--profile"}

# examples/gpt3/train_gpt3_175b_distributed.sh (core_v0.16.1): TP 8 x PP 16 -> TP 2 x PP 2 on 4 processes.
# It sets no --tokenizer-type (Megatron-LM refuses that): megagrow reads --vocab-file and --merge-file as GPT-2's BPE.
GPT3_175B = """
--num-layers 4 --hidden-size 64 --num-attention-heads 4 --seq-length 64 --max-position-embeddings 64
--attention-backend auto
--micro-batch-size 1 --global-batch-size 8 --rampup-batch-size 2 2 16 --train-iters 6 --weight-decay 0.1
--adam-beta1 0.9 --adam-beta2 0.95 --init-method-std 0.006 --clip-grad 1.0 --fp16 --lr 6.0e-5
--lr-decay-style cosine --min-lr 6.0e-6 --lr-warmup-fraction .001 --lr-decay-iters 5
--tensor-model-parallel-size 2 --pipeline-model-parallel-size 2
--data-path {tmp}/gpt2_text_document --vocab-file {tmp}/vocab.json
--merge-file {tmp}/merges.txt --split 949,50,1
--log-interval 1 --save-interval 3 --eval-interval 3 --save {tmp}/ckpt --load {tmp}/ckpt --eval-iters 1
--tensorboard-dir {tmp}/tb
"""
# Megatron-LM itself refuses a batch ramp in an iteration-counted run.
GPT3_REFUSED = {"--rampup-batch-size"}


def _without(argv: list[str], flags: set[str]) -> list[str]:
    """argv less these flags and their values."""
    out, skipping = [], False
    for token in argv:
        if token.startswith("--"):
            skipping = token in flags
        if not skipping:
            out.append(token)
    return out


def _run_until_it_trains(nproc, argv, tmp_path, allowed):
    """Launch; while it refuses, check the refusal is one line naming flags in `allowed`, drop them, relaunch."""
    from conftest import pretrain_job
    refused = set()
    for attempt in range(len(allowed) + 1):
        run = pretrain_job(nproc, _without(argv, refused), tmp_path / f"m{attempt}.jsonl")
        if run.returncode == 0:
            return run, refused
        errors = {l for l in run.output.splitlines() if l.startswith("error: ")}
        assert len(errors) == 1, run.output[-3000:]
        line = errors.pop()
        named = {f for f in allowed - refused if re.search(rf"(error: |; ){re.escape(f)}[ :]", line)}
        assert named, run.output[-3000:]
        refused |= named
    raise AssertionError(f"still refused after dropping {refused}")


def _script(text, tmp_path):
    return text.format(tmp=tmp_path).split()


@pytest.mark.slow
def test_llama3_8b_fp8_script_runs_or_says_why(tmp_path):
    run, refused = _run_until_it_trains(2, _script(LLAMA3_8B_FP8, tmp_path), tmp_path, LLAMA3_REFUSED)
    assert refused == LLAMA3_REFUSED
    train = [r for r in run.metrics if r["kind"] == "train"]
    assert [r["iteration"] for r in train] == [1, 2, 3, 4, 5, 6]  # 50 samples at 8 a batch: 6 whole batches
    assert all(math.isfinite(r["lm loss"]) for r in train)
    assert "throughput per GPU (TFLOP/s/GPU)" in run.output
    assert os.path.isfile(tmp_path / "ckpt" / "latest_checkpointed_iteration.txt")


@pytest.fixture(scope="module")
def gpt2_bpe_data(bpe, data_dir, tmp_path_factory):
    """GPT-2 style vocab.json and merges.txt, and the test corpus' paragraphs (enough documents for the
    script's --split 949,50,1) preprocessed with them."""
    from conftest import run_tool
    d = tmp_path_factory.mktemp("gpt2")
    for key, name in (("vocab", "vocab.json"), ("merges", "merges.txt")):
        os.symlink(bpe[key], d / name)
    with open(d / "corpus.jsonl", "w") as out:
        for line in open(data_dir / "corpus.jsonl"):
            for paragraph in json.loads(line)["text"].split("\n\n"):
                if paragraph.strip():
                    out.write(json.dumps({"text": paragraph}) + "\n")
    run_tool("tools/preprocess_data.py", "--input", str(d / "corpus.jsonl"), "--output-prefix",
             str(d / "gpt2"), "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", bpe["vocab"],
             "--merge-file", bpe["merges"], "--append-eod")
    return d


@pytest.mark.slow
def test_gpt3_175b_script_runs_or_says_why(tmp_path, gpt2_bpe_data):
    for name in ("vocab.json", "merges.txt", "gpt2_text_document.bin", "gpt2_text_document.idx"):
        os.symlink(gpt2_bpe_data / name, tmp_path / name)
    run, refused = _run_until_it_trains(4, _script(GPT3_175B, tmp_path), tmp_path, GPT3_REFUSED)
    assert refused == GPT3_REFUSED
    assert [r["iteration"] for r in run.metrics if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
