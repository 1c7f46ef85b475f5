"""Megatron-LM's other tokenizer types, end to end: a byte-level BPE trained here (the `tokenizers` library, on
megagrow's own sources) saved as a Hugging Face tokenizer directory and as GPT-2's vocab.json + merges.txt,
preprocessed by tools/preprocess_data.py, trained on by pretrain_gpt.py; --mock-data; bad tokenizer input.
"""

import base64
import glob
import importlib.util
import json
import math
import os
import subprocess
import sys
import types

import pytest

from conftest import BPE_EOD as EOD, BPE_VOCAB as VOCAB, ROOT, run_tool, tiny_args, pretrain_job

from megagrow.model.shape import padded_vocab_size

# VOCAB (600) is padded to 640 at TP=1 and 768 at TP=2 (--make-vocab-size-divisible-by 128 x TP)
TEXT = "def f(x):\n\tif x:  # two spaces, a tab, é, ☃\n        return x * 42\n"


FLAGS = {"hf": lambda b: ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", b["hf"]],
         "gpt2": lambda b: ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", b["vocab"],
                            "--merge-file", b["merges"]]}


def _build(kind, b):
    from megagrow.data.tokenizer import build_tokenizer
    if kind == "hf":
        return build_tokenizer("HuggingFaceTokenizer", b["hf"])
    return build_tokenizer("GPT2BPETokenizer", vocab_file=b["vocab"], merge_file=b["merges"])


@pytest.mark.parametrize("kind", ["hf", "gpt2"])
def test_tokenizer_ids_and_round_trip(bpe, kind):
    tok = _build(kind, bpe)
    assert tok.vocab_size == VOCAB and tok.eod == 0  # eod: <|endoftext|>, the first token trained
    ids = tok.tokenize(TEXT)
    assert tok.detokenize(ids) == TEXT and all(0 <= i < VOCAB for i in ids) and tok.eod not in ids
    assert len(ids) < 0.8 * len(TEXT.encode())  # learned merges, not bytes
    assert _build("gpt2" if kind == "hf" else "hf", bpe).tokenize(TEXT) == ids  # both files: the same BPE
    assert tok.pad in (None, -1)  # no pad id: GPTDataset masks no label
    assert tok.unique_identifiers["class"]  # part of the dataset index cache key


@pytest.fixture(scope="module")
def corpus(bpe_corpus):
    return bpe_corpus


@pytest.fixture(scope="module")
def prefixes(corpus, bpe):
    """The corpus preprocessed by the tool with each tokenizer (two workers, --append-eod): {kind: prefix}."""
    out = {}
    for kind in FLAGS:
        run = run_tool("tools/preprocess_data.py", "--input", str(corpus / "corpus.jsonl"), "--output-prefix",
                       str(corpus / kind), *FLAGS[kind](bpe), "--append-eod", "--workers", "2")
        assert "Traceback" not in run.stderr and "forked" not in run.stderr, run.stderr
        out[kind] = str(corpus / f"{kind}_text_document")
    return out


@pytest.mark.parametrize("kind", ["hf", "gpt2"])
def test_preprocess_round_trips(corpus, bpe, prefixes, kind):
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    tok, ds = _build(kind, bpe), IndexedDataset(prefixes[kind])
    docs = [json.loads(line)["text"] for line in open(corpus / "corpus.jsonl")]
    assert len(ds) == len(docs)
    for i, doc in enumerate(docs):
        ids = ds[i].tolist()
        assert ids[-1] == tok.eod and ids[:-1] == tok.tokenize(doc), f"document {i}"
        # megatron-core's HuggingFaceTokenizer leaves special tokens out of the text (this file spells one)
        assert tok.detokenize(ids[:-1]) == (doc.replace(EOD, "") if kind == "hf" else doc), f"document {i}"


def _checkpoint(path) -> tuple[dict, object]:
    from megagrow.checkpoint.io import inspect, open_checkpoint
    view = open_checkpoint(str(path))
    try:
        return inspect(str(path)), view.args
    finally:
        view.close()


def _trained(run, save) -> dict:
    assert run.returncode == 0, run.output[-3000:]
    losses = run.losses()
    assert sorted(losses) == [1, 2, 3, 4] and all(math.isfinite(v) for v in losses.values()), losses
    assert losses[4] < losses[1], losses
    assert run.losses("valid") and all(math.isfinite(v) for v in run.losses("valid").values())
    info, args = _checkpoint(save)
    assert info["complete"] and info["iteration"] == 4, info
    return {"padded": info["model"]["padded_vocab_size"], "args": args}


@pytest.mark.slow
@pytest.mark.parametrize("kind,tp", [("hf", 1), ("gpt2", 2)])
def test_pretrain_trains(bpe, prefixes, tmp_path, kind, tp):
    argv = tiny_args(str(tmp_path), **{"--tokenizer-type": None, "--tokenizer-model": None,
                                       "--data-path": prefixes[kind], "--data-cache-path": str(tmp_path / "cache"),
                                       "--save": str(tmp_path / "ckpt"), "--tensor-model-parallel-size": str(tp)})
    run = pretrain_job(tp, argv + FLAGS[kind](bpe), tmp_path / "m.jsonl")
    got = _trained(run, tmp_path / "ckpt")
    assert got["padded"] == padded_vocab_size(VOCAB, 128, tp) == {1: 640, 2: 768}[tp]
    assert got["args"].tokenizer_vocab_size == VOCAB
    assert got["args"].tokenizer_type == {"hf": "HuggingFaceTokenizer", "gpt2": "GPT2BPETokenizer"}[kind]


@pytest.mark.slow
def test_mock_data_trains(tmp_path):
    """megatron-core's MockGPTDataset: no --data-path, no data files (Megatron-LM's --mock-data); samples without
    an attention mask (the attention makes its causal one)."""
    argv = tiny_args(str(tmp_path), **{"--tokenizer-type": "NullTokenizer", "--tokenizer-model": None,
                                       "--data-path": None, "--split": None, "--data-cache-path": None,
                                       "--save": str(tmp_path / "ckpt")})
    run = pretrain_job(1, argv + ["--mock-data", "--vocab-size", "300", "--no-create-attention-mask-in-dataloader"],
                   tmp_path / "m.jsonl")
    assert _trained(run, tmp_path / "ckpt")["padded"] == 384  # NullTokenizer: 300 ids and its eod, padded


def _trainer(argv) -> subprocess.CompletedProcess:
    env = {**os.environ, "WORLD_SIZE": "1", "RANK": "0"}
    return subprocess.run([sys.executable, "pretrain_gpt.py", *argv], cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=120)


def _one_line(out, message: str) -> None:
    assert out.returncode == 1, out.stdout + out.stderr
    assert out.stderr.strip() == f"error: {message}", out.stderr
    assert "Traceback" not in out.stdout + out.stderr


def test_bad_tokenizer_input_is_one_line(bpe, prefixes, tmp_path):
    missing = str(tmp_path / "missing_vocab.json")
    base = tiny_args(str(tmp_path), **{"--tokenizer-type": None, "--tokenizer-model": None,
                                       "--data-path": prefixes["gpt2"], "--data-cache-path": None})
    _one_line(_trainer(base + ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", missing,
                               "--merge-file", bpe["merges"]]),
              f"vocab file not found: {missing} (--vocab-file)")
    not_tokenizer = tmp_path / "not_a_tokenizer"
    not_tokenizer.mkdir()
    (not_tokenizer / "README").write_text("no tokenizer here\n")
    _one_line(_trainer(base + ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(not_tokenizer)]),
              f"--tokenizer-model {not_tokenizer}: not a Hugging Face tokenizer directory (none of "
              "tokenizer.json, tokenizer_config.json, tokenizer.model, vocab.json, vocab.txt in it)")
    # The preprocess tool says the same.
    (tmp_path / "in.jsonl").write_text(json.dumps({"text": TEXT}) + "\n")
    _one_line(run_tool("tools/preprocess_data.py", "--input", str(tmp_path / "in.jsonl"), "--output-prefix",
                       str(tmp_path / "x"), "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", missing,
                       "--merge-file", bpe["merges"], check=False),
              f"vocab file not found: {missing} (--vocab-file)")


def test_tokenizer_errors_name_the_flag(bpe, tmp_path):
    from megagrow.data.tokenizer import TokenizerError, build_tokenizer
    hub_name = "gpt2"  # never looked up on the hub: a local directory only
    cases = [
        (dict(tokenizer_type="HuggingFaceTokenizer", tokenizer_model=hub_name),
         f"tokenizer directory not found: {hub_name} (--tokenizer-model)"),
        (dict(tokenizer_type="HuggingFaceTokenizer", tokenizer_model=bpe["vocab"]),
         f"--tokenizer-model {bpe['vocab']}: not a directory"),
        (dict(tokenizer_type="GPT2BPETokenizer", vocab_file=bpe["vocab"]),
         "GPT2BPETokenizer needs a merge file (--merge-file)"),
        (dict(tokenizer_type="GPT2BPETokenizer", vocab_file=bpe["merges"], merge_file=bpe["merges"]),
         f"--vocab-file {bpe['merges']}: not GPT-2's vocab.json"),
        (dict(tokenizer_type="GPT2BPETokenizer", vocab_file=bpe["vocab"], merge_file=bpe["vocab"]),
         f"--merge-file {bpe['vocab']}: not GPT-2 merges of --vocab-file {bpe['vocab']}"),
        (dict(tokenizer_type="Llama2Tokenizer", tokenizer_model=bpe["hf"]),
         f"--tokenizer-model {bpe['hf']}: a directory, not a tokenizer model file"),
    ]
    for flags, message in cases:
        with pytest.raises(TokenizerError) as e:
            build_tokenizer(**flags)
        assert str(e.value).startswith(message) and "\n" not in str(e.value), (flags, str(e.value))


def test_llama2_tokenizer_is_the_sentencepiece_vocabulary(tmp_path):
    from conftest import write_tokenizer
    from megagrow.data.tokenizer import build_tokenizer
    write_tokenizer(tmp_path / "tok.model")
    llama, gpt = (build_tokenizer(kind, str(tmp_path / "tok.model")) for kind in ("Llama2Tokenizer",
                                                                                   "GPTSentencePieceTokenizer"))
    text = "the quick brown fox 7"
    assert llama.tokenize(text) == gpt.tokenize(text) and llama.detokenize(llama.tokenize(text)) == text
    assert (llama.vocab_size, llama.eod, llama.pad) == (gpt.vocab_size, gpt.eod, gpt.pad)
    assert llama.unique_identifiers["class"] == "Llama2Tokenizer"


def _tiktoken_vocab(path, merges=(b"  ", b"    ", b"re", b"ret", b"return", b"de", b"def", b" x")) -> int:
    """A vocabulary as Megatron-LM's TikTokenizer reads it: the 256 bytes, then some merges."""
    tokens = [bytes([i]) for i in range(256)] + list(merges)
    json.dump([{"rank": i, "token_bytes": base64.b64encode(t).decode(), "token_str": t.decode("latin-1")}
               for i, t in enumerate(tokens)], open(path, "w"))
    return len(tokens)


HAVE_TIKTOKEN = importlib.util.find_spec("tiktoken") is not None


@pytest.mark.skipif(not HAVE_TIKTOKEN, reason="tiktoken is not installed (pip install megagrow[hf])")
def test_tiktokenizer(tmp_path):
    from megagrow.data.tokenizer import TokenizerError, build_tokenizer
    n = _tiktoken_vocab(tmp_path / "tt.json")
    tok = build_tokenizer("TikTokenizer", str(tmp_path / "tt.json"), vocab_size=n + 10, tiktoken_num_special_tokens=10)
    text = "def f(x):\n    return x  # plain\n"
    ids = tok.tokenize(text)
    assert tok.detokenize(ids) == text and min(ids) >= 10  # the file's tokens follow the special ones
    assert (tok.vocab_size, tok.eod, tok.pad) == (n + 10, 2, 4)  # eod </s>, pad <pad>: Megatron-LM's ids
    with pytest.raises(TokenizerError, match=f"^--tokenizer-model .*tt.json: {n} tokens, fewer than --vocab-size"):
        build_tokenizer("TikTokenizer", str(tmp_path / "tt.json"), vocab_size=2000)


@pytest.mark.skipif(HAVE_TIKTOKEN, reason="tiktoken is installed")
def test_tiktokenizer_without_tiktoken_is_refused(tmp_path):
    _tiktoken_vocab(tmp_path / "tt.json")
    out = _trainer(tiny_args(str(tmp_path), **{"--tokenizer-type": "TikTokenizer", "--tokenizer-model":
                                               str(tmp_path / "tt.json"), "--data-path": None, "--split": None,
                                               "--data-cache-path": None}) + ["--mock-data"])
    _one_line(out, "--tokenizer-type TikTokenizer needs the tiktoken package, which is not installed "
                   "(pip install 'megagrow[hf]')")


def test_plan_preflight_reads_the_new_types(bpe):
    """A plan's tokenizer files are checked before stage 0 by the same table the trainer builds from."""
    from megagrow.scheduling.preflight import check_data
    from megagrow.scheduling.timing import PlanError
    def plan(**data):  # what check_data reads of a plan
        return types.SimpleNamespace(training={}, data={"mock_data": True, **data})
    check_data(plan(tokenizer_type="GPT2BPETokenizer", vocab_file=bpe["vocab"], merge_file=bpe["merges"]))
    check_data(plan(tokenizer_type="HuggingFaceTokenizer", tokenizer_model=bpe["hf"]))
    with pytest.raises(PlanError, match=r"^data.merge_file: missing \(data.tokenizer_type GPT2BPETokenizer needs "):
        check_data(plan(tokenizer_type="GPT2BPETokenizer", vocab_file=bpe["vocab"]))
    with pytest.raises(PlanError, match="^data.tokenizer_model: /no/such/dir not found"):
        check_data(plan(tokenizer_type="HuggingFaceTokenizer", tokenizer_model="/no/such/dir"))
