"""The data pipeline: stdlib corpus -> sentencepiece -> indexed dataset -> megatron-core GPTDataset.

`data_dir` (tests/conftest.py, session-scoped) runs the three tools once: a ~1.5 MB corpus, a
1024-piece tokenizer, and corpus_text_document.bin/.idx tokenized with --append-eod.
"""

import json
import re
import os

import numpy as np
import pytest
import torch

from conftest import run_tool

SPLIT = "90,5,5"


def _docs(data_dir) -> list[str]:
    return [json.loads(line)["text"] for line in open(f"{data_dir}/corpus.jsonl")]


@pytest.fixture(scope="module")
def tok(data_dir):
    from megagrow.data.tokenizer import build_tokenizer
    return build_tokenizer("GPTSentencePieceTokenizer", f"{data_dir}/tok.model")


@pytest.fixture(scope="module")
def parallel_prefix(data_dir, tmp_path_factory):
    """The same corpus preprocessed again with two tokenizing processes."""
    out = tmp_path_factory.mktemp("parallel")
    run_tool("tools/preprocess_data.py", "--input", f"{data_dir}/corpus.jsonl", "--output-prefix", f"{out}/corpus",
             "--tokenizer-type", "GPTSentencePieceTokenizer", "--tokenizer-model", f"{data_dir}/tok.model",
             "--append-eod", "--workers", "2", "--log-interval", "10")
    return f"{out}/corpus_text_document"


def test_stdlib_corpus_is_real_deterministic_and_capped(tmp_path):
    from megagrow.data.corpus import write_stdlib_corpus
    cap = 300_000
    n = write_stdlib_corpus(str(tmp_path / "a.jsonl"), max_bytes=cap)
    assert write_stdlib_corpus(str(tmp_path / "b.jsonl"), max_bytes=cap) == n
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    rows = [json.loads(line) for line in open(tmp_path / "a.jsonl")]
    assert len(rows) == n > 1
    sizes = [len(r["text"].encode()) for r in rows]
    assert sum(sizes) >= cap > sum(sizes) - sizes[-1]  # stops at the first document reaching the cap
    paths = [r["path"] for r in rows]
    assert paths == sorted(paths) and len(set(paths)) == n

    full = write_stdlib_corpus(str(tmp_path / "full.jsonl"))
    rows = [json.loads(line) for line in open(tmp_path / "full.jsonl")]
    assert full == len(rows) > 5 * n
    by_path = {r["path"]: r["text"] for r in rows}
    import sysconfig
    with open(os.path.join(sysconfig.get_paths()["stdlib"], "json", "decoder.py"), encoding="utf-8") as f:
        assert by_path["json/decoder.py"] == f.read()  # real files, verbatim
    skipped = {"site-packages", "test", "tests", "idlelib", "lib2to3"}
    assert not any(skipped & set(p.split("/")) for p in by_path)
    assert not list(tmp_path.glob("*.tmp"))


def test_tokenizer_roundtrip_and_special_ids(data_dir, tok):
    assert tok.vocab_size == 1024
    assert (tok.eod, tok.pad) == (2, 3)  # eos doubles as eod; pad distinct, so GPTDataset honours it
    text = "def f(x):\n\tif x:  # two spaces, a tab, é, ☃ (unseen: byte fallback)\n        return x * 42\n"
    ids = tok.tokenize(text)
    assert tok.detokenize(ids) == text
    assert all(0 <= i < tok.vocab_size for i in ids) and tok.eod not in ids and tok.pad not in ids
    doc = _docs(data_dir)[-1]
    assert tok.detokenize(tok.tokenize(doc)) == doc
    assert len(tok.tokenize(doc)) < 0.75 * len(doc.encode())  # learned merges, not bytes


def test_tokenizer_training_is_deterministic(data_dir, tmp_path):
    from megagrow.data.tokenizer import train_sentencepiece
    import sentencepiece as spm
    path = train_sentencepiece(f"{data_dir}/corpus.jsonl", str(tmp_path / "tok"), vocab_size=1024)
    # The same pieces and scores (the file itself also records its own path).
    a, b = spm.SentencePieceProcessor(model_file=path), spm.SentencePieceProcessor(model_file=f"{data_dir}/tok.model")
    assert [(a.id_to_piece(i), a.get_score(i)) for i in range(1024)] == \
           [(b.id_to_piece(i), b.get_score(i)) for i in range(1024)]
    assert sorted(os.listdir(tmp_path)) == ["tok.model", "tok.vocab"]


def test_build_tokenizer_null_and_errors(tmp_path):
    from megagrow.data.tokenizer import build_tokenizer
    null = build_tokenizer("NullTokenizer", None, vocab_size=100)
    assert (null.vocab_size, null.eod, null.pad) == (101, 100, -1)  # Megatron-LM: eod follows the ids
    assert null.tokenize("5 6 7") == [5, 6, 7] and null.detokenize([5, 6]) == "5 6"
    missing = str(tmp_path / "missing.model")
    with pytest.raises(FileNotFoundError, match=f"^tokenizer model not found: {re.escape(missing)}$"):
        build_tokenizer("GPTSentencePieceTokenizer", missing)
    with pytest.raises(ValueError, match="GPT2BPETokenizer"):
        build_tokenizer("GPT2BPETokenizer", missing)


def test_preprocess_matches_tokenizer(data_dir, tok, parallel_prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    ds = IndexedDataset(f"{data_dir}/corpus_text_document")
    docs = _docs(data_dir)
    assert len(ds) == len(docs) and ds[0].dtype == np.uint16
    for i, doc in enumerate(docs):
        assert ds[i].tolist() == tok.tokenize(doc) + [tok.eod], f"document {i}"
    # Two workers keep the order: the very same bytes.
    for ext in (".bin", ".idx"):
        assert open(parallel_prefix + ext, "rb").read() == open(f"{data_dir}/corpus_text_document{ext}", "rb").read()
    assert sorted(os.listdir(os.path.dirname(parallel_prefix))) == ["corpus_text_document.bin",
                                                                   "corpus_text_document.idx"]


def test_preprocess_null_tokenizer_several_keys(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    rows = [{"text": "1 2 3", "title": "7"}, {"text": "4 5", "title": "8 9"}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = run_tool("tools/preprocess_data.py", "--input", str(tmp_path / "in.jsonl"), "--output-prefix",
                   str(tmp_path / "x"), "--json-keys", "text", "title", "--tokenizer-type", "NullTokenizer",
                   "--vocab-size", "10", "--append-eod")
    assert "2 documents" in out.stdout
    text, title = IndexedDataset(str(tmp_path / "x_text_document")), IndexedDataset(str(tmp_path / "x_title_document"))
    assert [text[i].tolist() for i in range(2)] == [[1, 2, 3, 10], [4, 5, 10]]
    assert [title[i].tolist() for i in range(2)] == [[7, 10], [8, 9, 10]]


def _in_documents(window: list[int], docs: list[list[int]], eod: int) -> bool:
    """Whether a sample is a run of consecutive tokens of the documents (in any document order):
    the part before each eod ends a document, the part after it starts one."""
    spelled = [" " + " ".join(map(str, d)) + " " for d in docs]
    parts, start = [], 0
    for i, t in enumerate(window):
        if t == eod:
            parts.append(window[start:i + 1])
            start = i + 1
    parts.append(window[start:])
    for k, part in enumerate(parts):
        if not part:
            continue
        s = " " + " ".join(map(str, part)) + " "
        first, last = k == 0, k == len(parts) - 1
        if not any((s in d) if first and last else d.endswith(s) if first else d.startswith(s) if last
                   else d == s for d in spelled):
            return False
    return True


def test_gpt_datasets_samples(data_dir, tok, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from megagrow.data.datasets import build_gpt_datasets
    seq = 32
    prefix = f"{data_dir}/corpus_text_document"
    datasets = build_gpt_datasets([prefix], SPLIT, seq, 1234, tok, [40, 10, 10], data_cache_path=str(tmp_path))
    indexed = IndexedDataset(prefix)
    n = len(indexed)
    bounds = {"train": (0, round(0.9 * n)), "valid": (round(0.9 * n), round(0.95 * n)), "test": (round(0.95 * n), n)}
    causal = torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1)  # True = masked
    for name, ds in zip(("train", "valid", "test"), datasets):
        assert len(ds) >= {"train": 40}.get(name, 10)
        docs = [indexed[i].tolist() for i in range(*bounds[name])]
        for i in (0, 1, len(ds) // 2, len(ds) - 1):
            s = ds[i]
            assert set(s) == {"tokens", "labels", "loss_mask", "position_ids", "attention_mask"}
            assert s["tokens"].shape == s["labels"].shape == s["loss_mask"].shape == (seq,)
            assert s["tokens"][1:].tolist() == s["labels"][:-1].tolist()
            assert s["position_ids"].tolist() == list(range(seq))
            assert s["loss_mask"].tolist() == [1.0] * seq
            assert torch.equal(s["attention_mask"][0], causal)
            # Drawn from this split's documents only.
            assert _in_documents(s["tokens"].tolist() + [s["labels"][-1].item()], docs, tok.eod), (name, i)
    assert any(f.endswith("-GPTDataset-train-shuffle_index.npy") for f in os.listdir(tmp_path))
    # Same seed: same samples (here from the cache); another seed: another order.
    again = build_gpt_datasets([prefix], SPLIT, seq, 1234, tok, [40, 10, 10], data_cache_path=str(tmp_path))
    other = build_gpt_datasets([prefix], SPLIT, seq, 99, tok, [40, 10, 10], data_cache_path=str(tmp_path))
    assert all(torch.equal(datasets[0][i]["tokens"], again[0][i]["tokens"]) for i in range(40))
    assert not all(torch.equal(datasets[0][i]["tokens"], other[0][i]["tokens"]) for i in range(40))


def test_gpt_datasets_blend(data_dir, tok, parallel_prefix, tmp_path):
    from megagrow.data.datasets import build_gpt_datasets
    blend = ["1", f"{data_dir}/corpus_text_document", "3", parallel_prefix]
    train, valid, test = build_gpt_datasets(blend, SPLIT, 16, 5, tok, [80, 8, 8], data_cache_path=str(tmp_path))
    assert len(train) >= 80 and len(valid) >= 8 and len(test) >= 8
    assert sorted(np.bincount(np.asarray(train.dataset_index)).tolist()) == [20, 60]  # weights 1:3
    s = train[7]
    assert s["tokens"][1:].tolist() == s["labels"][:-1].tolist()
    assert any("BlendedDataset" in f for f in os.listdir(tmp_path))  # its index cached too
    assert not torch.distributed.is_initialized()  # the one-rank group used for that is gone


def test_gpt_datasets_errors(data_dir, tok, tmp_path):
    from megagrow.data.datasets import build_gpt_datasets
    missing = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError) as e:
        build_gpt_datasets([missing], SPLIT, 32, 1, tok, [1, 1, 1])
    assert str(e.value) == f"data path not found: {missing} (expected {missing}.bin and {missing}.idx)"
    with pytest.raises(FileNotFoundError, match="data path not found"):
        build_gpt_datasets(["1", f"{data_dir}/corpus_text_document", "1", missing], SPLIT, 32, 1, tok, [1, 1, 1])
    # ~75 documents: "969,30,1" leaves the test split none (megatron-core itself would loop forever).
    with pytest.raises(ValueError, match="test split .* without tokens"):
        build_gpt_datasets([f"{data_dir}/corpus_text_document"], "969,30,1", 32, 1, tok, [1, 1, 1])


def _one_line_error(out, message):
    assert out.returncode == 1, out.stdout + out.stderr
    assert out.stderr.strip() == message, out.stderr
    assert "Traceback" not in out.stdout + out.stderr


def test_tool_errors_are_one_line(data_dir, tmp_path):
    corpus, model = f"{data_dir}/corpus.jsonl", f"{data_dir}/tok.model"
    missing_model, missing_input = str(tmp_path / "missing.model"), str(tmp_path / "missing.jsonl")

    def preprocess(inp, tok_model):
        return run_tool("tools/preprocess_data.py", "--input", inp, "--output-prefix", str(tmp_path / "x"),
                        "--tokenizer-type", "GPTSentencePieceTokenizer", "--tokenizer-model", tok_model, check=False)

    _one_line_error(preprocess(corpus, missing_model), f"error: tokenizer model not found: {missing_model}")
    _one_line_error(preprocess(missing_input, model), f"error: input not found: {missing_input}")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "x = 1\n"}) + "\n" + "{not json\n")
    out = preprocess(str(bad), model)
    assert out.returncode == 1 and out.stderr.startswith(f"error: {bad}:2:") and out.stderr.count("\n") == 1
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl"]  # nothing half-written left behind
    _one_line_error(run_tool("tools/train_tokenizer.py", "--input", missing_input, "--model-prefix",
                             str(tmp_path / "t"), check=False), f"error: input not found: {missing_input}")
