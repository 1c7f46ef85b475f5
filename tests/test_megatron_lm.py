"""Checkpoints written by NVIDIA Megatron-LM itself (../shared/fixtures/megatron-lm, see its README) and
by megatron-core 0.19's dist_checkpointing (tests/fixtures/mcore019): inspected, converted, grown and
trained from as they are, with the fixtures' own model flags and nothing more.
"""

import json
import os
import shutil

import pytest
import torch

from conftest import ROOT, pretrain_job
from test_checkpoint import logits, megagrow

MEGATRON_LM = os.environ.get("MEGAGROW_MEGATRON_LM_FIXTURES",
                             os.path.join(ROOT, "..", "shared", "fixtures", "megatron-lm"))
MCORE019 = os.path.join(ROOT, "tests", "fixtures", "mcore019")

# The fixtures' README: model and training flags (data paths added per run).
FLAGS = ("--num-layers 4 --hidden-size 128 --ffn-hidden-size 256 --num-attention-heads 4 --group-query-attention "
         "--num-query-groups 2 --seq-length 64 --max-position-embeddings 64 --swiglu --normalization RMSNorm "
         "--position-embedding-type rope --untie-embeddings-and-output-weights --disable-bias-linear "
         "--hidden-dropout 0.0 --attention-dropout 0.0 --init-method-std 0.02 --transformer-impl local "
         "--train-iters 20 --micro-batch-size 2 --global-batch-size 8 --lr 1e-3 --min-lr 1e-4 "
         "--lr-decay-style cosine --lr-warmup-iters 2 --weight-decay 0.1 --clip-grad 1.0 --seed 1234 "
         "--split 90,5,5 --tokenizer-type GPTSentencePieceTokenizer --log-interval 1 --eval-interval 1000 "
         "--eval-iters 1").split()
LAYOUT = {"torch_dist_tp2": ["--tensor-model-parallel-size", "2"],
          "torch_tp2": ["--tensor-model-parallel-size", "2", "--ckpt-format", "torch"],
          "distopt_dp2": ["--use-distributed-optimizer"],
          "distopt_dp2_fully_reshardable": ["--use-distributed-optimizer"]}
# What Megatron-LM logged on resuming each (README). Its dp_reshardable resume on torch's Adam restarts
# Adam's step count (iterations 12-13 off); megagrow's continues as the uninterrupted run, which the
# fully_reshardable row matches to 5e-10.
LOGGED = {"torch_dist_tp2": {11: 6.308397293, 12: 6.199210644, 13: 6.138466835},
          "torch_tp2": {11: 6.308397293, 12: 6.199210644, 13: 6.138466835},
          "distopt_dp2": {11: 6.299454689},
          "distopt_dp2_fully_reshardable": {11: 6.299454689, 12: 6.176845551, 13: 6.142984390}}
UNINTERRUPTED_DISTOPT = LOGGED["distopt_dp2_fully_reshardable"]


# Conversion moves weights bit for bit (assert_same_tensors); logits computed at another TP/PP differ only by
# fp32 rounding of a changed reduction order (row-parallel partial sums added across ranks): a few ulps of
# logits of magnitude ~5, where 1 ulp is 4.8e-7.
LOGITS_ATOL = 5e-6


def assert_same_tensors(a, b, with_optimizer: bool):
    """Every model tensor (and optimizer state where both keep it) of checkpoints a and b is identical."""
    from megagrow.checkpoint.io import open_checkpoint
    va, vb = open_checkpoint(str(a)), open_checkpoint(str(b))
    try:
        units = [(va.read_globals(), vb.read_globals())]
        units += [(va.read_layer(i), vb.read_layer(i)) for i in range(va.num_layers)]
        for ua, ub in units:
            kinds = sorted(ua) if with_optimizer else ["model"]
            for kind in kinds:
                assert sorted(ua[kind]) == sorted(ub[kind]), kind
                for key, t in ua[kind].items():
                    assert torch.equal(t, ub[kind][key]), (kind, key)
    finally:
        va.close()
        vb.close()


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    """A writable copy of the Megatron-LM fixtures (the originals are never written to)."""
    if not os.path.isdir(MEGATRON_LM):
        pytest.skip(f"Megatron-LM fixtures not found at {MEGATRON_LM}")
    d = tmp_path_factory.mktemp("megatron_lm")
    shutil.copytree(MEGATRON_LM, d / "fx")
    shutil.copytree(MCORE019, d / "mcore019")
    return d


def data_flags(fx, tmp_path) -> list[str]:
    return ["--data-path", f"{fx}/fx/data/corpus_text_document", "--tokenizer-model", f"{fx}/fx/data/tokenizer.model",
            "--data-cache-path", str(tmp_path / "cache")]


def test_inspect_every_fixture(fixtures):
    expected = {"torch_dist_tp2": ("torch_dist", 2, "plain"), "torch_tp2": ("torch", 2, "plain"),
                "distopt_dp2": ("torch_dist", 1, "distributed"),
                "distopt_dp2_fully_reshardable": ("torch_dist", 1, "distributed")}
    for name, (fmt, tp, opt) in expected.items():
        info = json.loads(megagrow("checkpoint", "inspect", str(fixtures / "fx" / name), "--json").stdout)
        assert info["complete"], info["problems"]
        assert (info["format"], info["tensor_model_parallel_size"], info["iteration"]) == (fmt, tp, 10)
        assert info["optimizer"].startswith(opt) and "step 10" in info["optimizer"]
        assert info["model"]["num_query_groups"] == 2 and info["model"]["padded_vocab_size"] == 1024
    for name in ("torch_dist_tp2", "distopt_dp2"):
        info = json.loads(megagrow("checkpoint", "inspect", str(fixtures / "mcore019" / name), "--json").stdout)
        assert info["complete"] and info["iteration"] == 3, info["problems"]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAYOUT))
def test_resume_continues_megatron_lm_losses(fixtures, tmp_path, name):
    """The same model flags and nothing more: RNG, optimizer and scheduler restored as Megatron-LM wrote them;
    the saved checkpoint has Megatron-LM's RNG layout and content_metadata."""
    src = tmp_path / "ck"
    shutil.copytree(fixtures / "fx" / name, src)
    run = pretrain_job(2, FLAGS + LAYOUT[name] + data_flags(fixtures, tmp_path) +
                   ["--load", str(src), "--save", str(src), "--exit-interval", "13"], tmp_path / "m.jsonl")
    assert run.returncode == 0, run.output
    losses = run.losses()
    assert sorted(losses) == [11, 12, 13]
    want = UNINTERRUPTED_DISTOPT if name.startswith("distopt") else LOGGED[name]
    for it, loss in want.items():
        assert abs(losses[it] - loss) <= 1e-4, (it, losses[it], loss)
    if LAYOUT[name][-1] == "torch":
        state = torch.load(src / "iter_0000013" / "mp_rank_00" / "model_optim_rng.pt", weights_only=False)
        assert sorted(state["rng_state"][0]) == ["cuda_rng_state", "np_rng_state", "random_rng_state",
                                                 "rng_tracker_states", "torch_rng_state"]
        return
    from torch.distributed.checkpoint import FileSystemReader
    from megagrow.checkpoint.dcp_stream import read_common_state
    keys = FileSystemReader(str(src / "iter_0000013")).read_metadata().state_dict_metadata
    tp = int(LAYOUT[name][1]) if LAYOUT[name][0].startswith("--tensor") else 1
    assert {f"rng_state/shard_0.{r}_1.{tp}" for r in range(tp)} <= set(keys)  # (pp, tp), DP as replicas
    meta = read_common_state(str(src / "iter_0000013"))["content_metadata"]
    assert meta["chained_optim_avoid_prefix"] is True and meta["singleton_local_shards"] is False
    if name.startswith("distopt"):
        assert meta["distrib_optim_sharding_type"] == "fully_reshardable"


@pytest.mark.slow
def test_convert_fixtures_keeps_logits(fixtures, tmp_path):
    """Each fixture converted to another TP/PP and to the other format computes the fixture's own logits."""
    cases = [("torch_dist_tp2", ["--target-tp", "1", "--target-pp", "2"]),
             ("torch_dist_tp2", ["--target-tp", "1", "--ckpt-format", "torch"]),
             ("torch_tp2", ["--target-tp", "1", "--target-pp", "2", "--ckpt-format", "torch_dist"]),
             ("distopt_dp2", ["--target-tp", "2"]),
             ("distopt_dp2", ["--target-pp", "2", "--ckpt-format", "torch", "--no-optimizer"]),
             ("distopt_dp2_fully_reshardable", ["--target-tp", "2", "--ckpt-format", "torch", "--no-optimizer"])]
    reference = {}
    for i, (name, flags) in enumerate(cases):
        src = fixtures / "fx" / name
        if name not in reference:
            reference[name] = logits(src, 2 if "tp2" in name else 1, tmp_path)
        out = tmp_path / f"conv{i}"
        megagrow("checkpoint", "convert", "--load", str(src), "--save", str(out), *flags)
        info = json.loads(megagrow("checkpoint", "inspect", str(out), "--json").stdout)
        assert info["complete"], info["problems"]
        assert_same_tensors(src, out, with_optimizer="--no-optimizer" not in flags)
        nproc = info["tensor_model_parallel_size"] * info["pipeline_model_parallel_size"]
        diff = (logits(out, nproc, tmp_path) - reference[name]).abs().max().item()
        assert diff <= LOGITS_ATOL, (name, flags, diff)
    # 0.19's layout (common state inside the DCP files), read on any megatron-core.
    src = fixtures / "mcore019" / "torch_dist_tp2"
    out = tmp_path / "from019"
    megagrow("checkpoint", "convert", "--load", str(src), "--save", str(out), "--target-tp", "1")
    assert os.path.isfile(out / "iter_0000003" / "common.pt")
    reference = logits(out, 1, tmp_path)
    megagrow("checkpoint", "convert", "--load", str(out), "--save", str(tmp_path / "back"), "--target-tp", "2",
             "--target-pp", "2", "--ckpt-format", "torch")
    assert_same_tensors(out, tmp_path / "back", with_optimizer=True)
    assert (logits(tmp_path / "back", 4, tmp_path) - reference).abs().max().item() <= LOGITS_ATOL


@pytest.mark.slow
def test_grow_fixtures_and_train(fixtures, tmp_path):
    """stack and zero from each of Megatron-LM's checkpoints; a zero-grown model computes the same function,
    so its first loss is Megatron-LM's logged one, and it trains on (optimizer state carried)."""
    for name in LAYOUT:
        for op, layers in (("stack:g=2", 8), ("zero", 6)):
            out = tmp_path / f"{name}_{op[:4]}"
            megagrow("checkpoint", "grow", "--load", str(fixtures / "fx" / name), "--save", str(out), "--op", op,
                     *(["--num-layers", str(layers)] if op == "zero" else []))
            info = json.loads(megagrow("checkpoint", "inspect", str(out), "--json").stdout)
            assert info["complete"] and info["model"]["num_layers"] == layers, info["problems"]
            assert info["optimizer"] and "step 10" in info["optimizer"]
    flags = [f if f != "4" or FLAGS[i - 1] != "--num-layers" else "6" for i, f in enumerate(FLAGS)]
    for name in ("torch_dist_tp2", "distopt_dp2"):
        run = pretrain_job(2, flags + LAYOUT[name] + data_flags(fixtures, tmp_path) +
                       ["--load", str(tmp_path / f"{name}_zero"), "--exit-interval", "13"], tmp_path / f"{name}.jsonl")
        assert run.returncode == 0, run.output
        losses = run.losses()
        assert abs(losses[11] - LOGGED[name][11]) <= 1e-4, losses
        assert losses[13] < losses[11]


@pytest.mark.slow
def test_resume_mcore019_fixtures(fixtures, tmp_path):
    """Checkpoints in megatron-core 0.19's layout (dp_reshardable distributed optimizer) resume continuously;
    on an older megatron-core the trainer says in one line to convert them first."""
    from megagrow.runtime.versions import READS_COMMON_STATE_IN_DCP
    spec = open(os.path.join(MCORE019, "flags.txt")).read().split()
    for name, layout in (("torch_dist_tp2", ["--tensor-model-parallel-size", "2"]),
                         ("distopt_dp2", ["--use-distributed-optimizer", "--dist-ckpt-optim-sharding", "dp_reshardable"])):
        src = fixtures / "mcore019" / name
        run = pretrain_job(2, spec + layout + data_flags(fixtures, tmp_path) + ["--load", str(src)], tmp_path / f"{name}.jsonl")
        if not READS_COMMON_STATE_IN_DCP:
            assert run.returncode != 0 and "convert it first" in run.output
            continue
        assert run.returncode == 0, run.output
        want = {int(k): v for k, v in json.load(open(src / "losses.json")).items()}
        got = run.losses()
        assert sorted(got) == sorted(want) and all(abs(got[i] - want[i]) <= 1e-5 for i in want), (got, want)


def test_vocabulary_mismatch_is_one_line(fixtures, tmp_path):
    """Megatron-LM's SentencePieceTokenizer is the same model plus 4 tokens: a different vocabulary."""
    flags = [f if f != "GPTSentencePieceTokenizer" else "SentencePieceTokenizer" for f in FLAGS]
    run = pretrain_job(2, flags + LAYOUT["torch_dist_tp2"] + data_flags(fixtures, tmp_path) +
                   ["--load", str(fixtures / "fx" / "torch_dist_tp2"), "--exit-interval", "11"], tmp_path / "v.jsonl")
    assert run.returncode != 0
    errors = [l for l in run.output.splitlines() if l.startswith("error:")]
    assert errors and "vocabulary 1024" in errors[0] and "1028" in errors[0], run.output


@pytest.mark.slow
@pytest.mark.parametrize("name", ["torch_dist_tp2", "torch_tp2"])
def test_exported_to_hugging_face_gives_megatron_core_logits(fixtures, tmp_path, name):
    """A Megatron-LM checkpoint exported as it is loads in transformers with megatron-core's logits."""
    transformers = pytest.importorskip("transformers")
    exported = tmp_path / "hf"
    megagrow("checkpoint", "export", "--load", str(fixtures / "fx" / name), "--save", str(exported), "--quiet")
    config = json.load(open(exported / "config.json"))
    assert config["architectures"] == ["LlamaForCausalLM"] and config["vocab_size"] == 1024
    model = transformers.AutoModelForCausalLM.from_pretrained(str(exported), dtype=torch.float32).eval()
    tokens = torch.randint(0, 1024, (2, 32), generator=torch.Generator().manual_seed(0))  # logits_worker's
    with torch.no_grad():
        theirs = model(tokens).logits
    assert (theirs - logits(fixtures / "fx" / name, 2, tmp_path)).abs().max() <= 1e-4
