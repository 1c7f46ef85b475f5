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
    from megagrow.data.tokenizer import TokenizerError, build_tokenizer
    null = build_tokenizer("NullTokenizer", None, vocab_size=100)
    assert (null.vocab_size, null.eod, null.pad) == (101, 100, -1)  # Megatron-LM: eod follows the ids
    assert null.tokenize("5 6 7") == [5, 6, 7] and null.detokenize([5, 6]) == "5 6"
    missing = str(tmp_path / "missing.model")
    message = f"tokenizer model not found: {missing} (--tokenizer-model)"
    with pytest.raises(TokenizerError, match="^" + re.escape(message) + "$"):
        build_tokenizer("GPTSentencePieceTokenizer", missing)
    with pytest.raises(TokenizerError, match=r"^GPT2BPETokenizer needs a vocab file \(--vocab-file\)$"):
        build_tokenizer("GPT2BPETokenizer", missing)
    with pytest.raises(TokenizerError, match="^unknown tokenizer type: 'BertWordPieceCase'"):
        build_tokenizer("BertWordPieceCase", missing)


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

    _one_line_error(preprocess(corpus, missing_model),
                    f"error: tokenizer model not found: {missing_model} (--tokenizer-model)")
    _one_line_error(preprocess(missing_input, model), f"error: input not found: {missing_input}")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "x = 1\n"}) + "\n" + "{not json\n")
    out = preprocess(str(bad), model)
    assert out.returncode == 1 and out.stderr.startswith(f"error: {bad}:2:") and out.stderr.count("\n") == 1
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl"]  # nothing half-written left behind
    _one_line_error(run_tool("tools/train_tokenizer.py", "--input", missing_input, "--model-prefix",
                             str(tmp_path / "t"), check=False), f"error: input not found: {missing_input}")


def test_gpt_datasets_per_split_mock_and_options(data_dir, tok, parallel_prefix, tmp_path):
    """Megatron-LM's other sources, handed to megatron-core: a blend per split, MockGPTDataset; and its options."""
    from megatron.core.datasets.gpt_dataset import MockGPTDataset
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from megagrow.data.datasets import build_gpt_datasets
    prefix = f"{data_dir}/corpus_text_document"
    train, valid, test = build_gpt_datasets(None, None, 32, 7, tok, [40, 10, 0], data_cache_path=str(tmp_path),
                                            per_split=[[prefix], ["1", parallel_prefix], None])
    assert len(train) >= 40 and len(valid) >= 10 and test is None
    indexed = IndexedDataset(parallel_prefix)
    docs = [indexed[i].tolist() for i in range(len(indexed))]  # the valid split is that whole corpus
    s = valid[3]
    assert _in_documents(s["tokens"].tolist() + [s["labels"][-1].item()], docs, tok.eod)

    mock = build_gpt_datasets(None, None, 32, 7, tok, [8, 8, 8], mock=True)
    assert all(isinstance(ds, MockGPTDataset) for ds in mock)
    assert all(0 <= t < tok.vocab_size for t in mock[0][0]["tokens"].tolist())

    plain = build_gpt_datasets([prefix], SPLIT, 32, 7, tok, [8, 2, 2], data_cache_path=str(tmp_path))
    read = build_gpt_datasets([prefix], SPLIT, 32, 7, tok, [8, 2, 2], data_cache_path=str(tmp_path),
                              mmap_bin_files=False, create_attention_mask=False)
    assert "attention_mask" not in read[0][0] and "attention_mask" in plain[0][0]
    assert all(torch.equal(plain[0][i]["tokens"], read[0][i]["tokens"]) for i in range(8))


def test_microbatches_workers_keep_the_order(data_dir, tok, tmp_path):
    """--num-workers: DataLoader processes read the same samples in the same order as in-process."""
    from megagrow.data.datasets import build_gpt_datasets
    from megagrow.data.loader import microbatches
    train, _, _ = build_gpt_datasets([f"{data_dir}/corpus_text_document"], SPLIT, 32, 3, tok, [40, 8, 8],
                                     data_cache_path=str(tmp_path))
    here, workers = (microbatches(train, 5, 2, 1, 2, "cpu", num_workers=n) for n in (0, 2))
    for step in range(4):
        a, b = next(here), next(workers)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        first = 5 + step * 4 + 2  # rank 1 of DP 2 takes the second pair of each step's 4 samples
        assert torch.equal(a["tokens"][0], train[first]["tokens"])
    # Reading leaves torch's global RNG alone (a resumed run restores it for dropout; evaluations start loaders).
    state = torch.random.get_rng_state()
    next(microbatches(train, 0, 2, 0, 1, "cpu"))
    assert torch.equal(torch.random.get_rng_state(), state)


def test_data_flags(data_dir, tmp_path):
    """Megatron-LM's data flags: its defaults and dests, and one source of data."""
    from conftest import tiny_args, write_indexed
    from megagrow.training.arguments import ArgumentError, build_parser, parse_args
    args = build_parser().parse_args(tiny_args(data_dir))
    defaults = {"split": "90,5,5", "mock_data": False, "num_workers": 2, "mmap_bin_files": True,
                "create_attention_mask_in_dataloader": True, "train_data_path": None, "valid_data_path": None,
                "test_data_path": None}
    assert {k: getattr(args, k) for k in defaults} == defaults
    assert build_parser().parse_args(tiny_args(data_dir, **{"--split": None})).split is None
    flags = build_parser().parse_args(tiny_args(data_dir) + ["--no-mmap-bin-files", "--num-workers", "0",
                                                              "--no-create-attention-mask-in-dataloader"])
    assert (flags.mmap_bin_files, flags.num_workers, flags.create_attention_mask_in_dataloader) == (False, 0, False)

    big = str(tmp_path / "big")
    write_indexed(big)  # 1000 documents: every split of the default gets some
    null = {"--tokenizer-type": "NullTokenizer", "--tokenizer-model": None, "--vocab-size": "8",
            "--data-cache-path": None}
    assert parse_args(tiny_args(data_dir, **null, **{"--data-path": big, "--split": None})).split == "969, 30, 1"
    none = {**null, "--data-path": None, "--split": None}
    mock = parse_args(tiny_args(data_dir, **none) + ["--mock-data"])
    assert mock.mock_data and mock.split is None  # megatron-core divides its documents evenly
    prefix = f"{data_dir}/corpus_text_document"
    per_split = parse_args(tiny_args(data_dir, **none) + ["--train-data-path", prefix, "--valid-data-path", big])
    assert per_split.split is None and per_split.train_data_path == [prefix]
    for extra, message in [
        (["--mock-data", "--data-path", big], "--mock-data and --data-path: give one source of data, not both"),
        (["--data-path", big, "--train-data-path", big], "--data-path and --train-data-path/--valid-data-path/"
                                                         "--test-data-path: give one source of data, not both"),
        (["--train-data-path", big, "--valid-data-path", big, "--split", "9,1,0"],
         "--split 9,1,0: only with --data-path or --mock-data"),
        (["--valid-data-path", big], "--train-data-path is required with --valid-data-path or --test-data-path"),
        (["--train-data-path", big], "--valid-data-path is required to evaluate (or pass --eval-iters 0)"),
        (["--train-data-path", str(tmp_path / "nope"), "--valid-data-path", big], "data path not found: "),
        (["--num-workers", "-1", "--mock-data"], "--num-workers -1: must be 0 or more"),
        ([], "--data-path is required (or --train-data-path and --valid-data-path, or --mock-data)"),
    ]:
        with pytest.raises(ArgumentError) as e:
            parse_args(tiny_args(data_dir, **none) + extra)
        assert str(e.value).startswith(message), (extra, str(e.value))
