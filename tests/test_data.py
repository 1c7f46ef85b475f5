import json

import numpy as np
import pytest

from conftest import run_tool


def test_stdlib_corpus_is_real_deterministic_and_capped(tmp_path):
    from megagrow.data.corpus import write_stdlib_corpus
    docs_a, size_a = write_stdlib_corpus(str(tmp_path / "a.jsonl"), max_bytes=300_000)
    docs_b, size_b = write_stdlib_corpus(str(tmp_path / "b.jsonl"), max_bytes=300_000)
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    assert docs_a == docs_b and 300_000 <= size_a < 300_000 + 500_000
    rows = [json.loads(l) for l in open(tmp_path / "a.jsonl")]
    assert all(r["path"].endswith(".py") and "test" not in r["path"].split("/")[0] for r in rows)
    assert any("def " in r["text"] for r in rows)


def test_tokenizer_roundtrip(data_dir):
    from megagrow.data.tokenizer import build_tokenizer
    tok = build_tokenizer("SentencePieceTokenizer", f"{data_dir}/tok.model")
    assert tok.vocab_size == 1024
    text = "def f(x):\n    return x * 42  # é ☃"
    ids = tok.tokenize(text)
    assert tok.detokenize(ids) == text  # byte fallback covers characters unseen in training
    assert tok.eod not in ids


def test_preprocess_matches_tokenizer(data_dir):
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from megagrow.data.tokenizer import build_tokenizer
    tok = build_tokenizer("SentencePieceTokenizer", f"{data_dir}/tok.model")
    ds = IndexedDataset(f"{data_dir}/corpus_text_document")
    docs = [json.loads(l)["text"] for l in open(f"{data_dir}/corpus.jsonl")]
    assert len(ds) == len(docs)
    for i in (0, len(docs) // 2, len(docs) - 1):
        assert ds[i].tolist() == tok.tokenize(docs[i]) + [tok.eod]
    assert ds[0].dtype == np.uint16


def test_gpt_datasets_shift_labels(data_dir):
    from megagrow.data.datasets import build_gpt_datasets
    from megagrow.data.tokenizer import build_tokenizer
    tok = build_tokenizer("SentencePieceTokenizer", f"{data_dir}/tok.model")
    train, valid, test = build_gpt_datasets([f"{data_dir}/corpus_text_document"], "90,5,5", 32, 1234, tok,
                                            [40, 10, 10], data_cache_path=f"{data_dir}/cache")
    assert len(train) >= 40 and len(valid) >= 10 and len(test) >= 10
    s = train[3]
    assert s["tokens"].shape == (32,) and s["labels"].shape == (32,)
    assert s["tokens"][1:].tolist() == s["labels"][:-1].tolist()
    assert s["position_ids"].tolist() == list(range(32))


def test_data_errors_are_one_line(tmp_path, data_dir):
    from megagrow.data.datasets import build_gpt_datasets
    with pytest.raises(FileNotFoundError, match="data path not found"):
        build_gpt_datasets([str(tmp_path / "nope")], "90,5,5", 32, 1, None, [1, 1, 1])
    out = run_tool("tools/preprocess_data.py", "--input", f"{data_dir}/corpus.jsonl", "--output-prefix",
                   str(tmp_path / "x"), "--tokenizer-model", str(tmp_path / "missing.model"), check=False)
    assert out.returncode == 1
    assert out.stderr.strip() == f"error: tokenizer model not found: {tmp_path / 'missing.model'}"
    assert not list(tmp_path.glob("x*"))
