"""Shared fixtures: a small real corpus, tokenizer and indexed dataset, and multi-rank jobs (pretrain_job, ranks)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from megagrow.runtime.ranks import free_port  # noqa: E402,F401  (tests rendezvous on it)


def run_tool(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True)
    if check and out.returncode != 0:
        raise AssertionError(f"{argv} failed:\n{out.stdout}\n{out.stderr}")
    return out


def write_indexed(prefix, documents: int = 1000) -> None:
    """A Megatron indexed dataset (.idx and .bin, written by megatron-core's builder) of `documents` two-token
    documents: enough for every split of the default --split 969,30,1 to get tokens."""
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.int32)
    for _ in range(documents):
        builder.add_item(torch.zeros(2, dtype=torch.int32))
        builder.end_document()
    builder.finalize(f"{prefix}.idx")


def write_tokenizer(path) -> None:
    """A real (tiny) sentencepiece model, for checks that open the tokenizer a plan or a flag names."""
    import sentencepiece as spm
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter([f"the quick brown fox {i}" for i in range(100)]),
                                   model_writer=model, vocab_size=32, model_type="char", minloglevel=2)
    with open(path, "wb") as f:
        f.write(model.getvalue())


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """Stdlib corpus (~1.5 MB), a 1024-piece sentencepiece model, and its indexed dataset."""
    d = tmp_path_factory.mktemp("data")
    run_tool("tools/prepare_stdlib_corpus.py", "--output", f"{d}/corpus.jsonl", "--max-bytes", "1500000")
    run_tool("tools/train_tokenizer.py", "--input", f"{d}/corpus.jsonl", "--model-prefix", f"{d}/tok",
             "--vocab-size", "1024")
    run_tool("tools/preprocess_data.py", "--input", f"{d}/corpus.jsonl", "--output-prefix", f"{d}/corpus",
             "--tokenizer-type", "GPTSentencePieceTokenizer", "--tokenizer-model", f"{d}/tok.model", "--append-eod")
    return d


@dataclass
class Run:
    returncode: int
    output: str
    metrics: list

    def losses(self, kind: str = "train") -> dict[int, float]:
        return {r["iteration"]: r["lm loss"] for r in self.metrics if r["kind"] == kind}


def tiny_args(data_dir, **overrides) -> list[str]:
    """A Llama-style tiny model on the test corpus; overrides replace flags (value None drops one)."""
    flags = {
        "--num-layers": "4", "--hidden-size": "64", "--num-attention-heads": "4", "--group-query-attention": "",
        "--num-query-groups": "2", "--swiglu": "", "--normalization": "RMSNorm", "--position-embedding-type": "rope",
        "--untie-embeddings-and-output-weights": "", "--seq-length": "64", "--micro-batch-size": "2",
        "--global-batch-size": "8", "--train-iters": "4", "--lr": "3e-3", "--lr-warmup-iters": "1",
        "--hidden-dropout": "0", "--attention-dropout": "0", "--data-path": f"{data_dir}/corpus_text_document",
        "--tokenizer-type": "GPTSentencePieceTokenizer", "--tokenizer-model": f"{data_dir}/tok.model",
        "--split": "90,5,5", "--log-interval": "1", "--eval-interval": "1000", "--eval-iters": "2",
        "--data-cache-path": f"{data_dir}/cache",
    }
    flags.update(overrides)
    argv = []
    for k, v in flags.items():
        if v is None:
            continue
        argv += [k] + ([v] if v != "" else [])
    return argv


class _RankServer:
    """The session's tests/rank_server.py process (started at first use, gone with the session)."""
    conn = None

    @classmethod
    def request(cls, request: dict) -> dict:
        if cls.conn is None:
            from multiprocessing.connection import Client
            address = os.path.join(tempfile.mkdtemp(prefix="megagrow-ranks-"), "socket")
            cls.process = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "rank_server.py"), address],
                                           cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
            for _ in range(600):  # it imports torch and megatron-core first, then listens
                if cls.process.poll() is not None:
                    raise RuntimeError("tests/rank_server.py did not start")
                try:
                    cls.conn = Client(address, family="AF_UNIX")
                    break
                except (FileNotFoundError, ConnectionRefusedError):
                    time.sleep(0.1)
            assert cls.conn is not None and cls.conn.recv() == "ready", "tests/rank_server.py did not start"
        try:
            cls.conn.send(request)
            return cls.conn.recv()
        except (EOFError, OSError) as e:  # the server died: the next job starts a new one
            cls.conn = None
            raise RuntimeError(f"tests/rank_server.py went away ({type(e).__name__})") from e


def ranks(nproc: int, script: str, argv: list[str], timeout: int = 300, real: bool = False) -> tuple[int, str]:
    """SCRIPT ARGV (a path under the repository) as an `nproc`-rank job -> (exit code, output). The ranks are
    forked from a process that has already imported torch and megatron-core (tests/rank_server.py: torchrun's
    environment, the script as __main__, gloo between real processes); real=True launches the job with torchrun
    itself, for what depends on torchrun's own behaviour."""
    if real:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-port", str(free_port()), script, *argv]
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
        return out.returncode, out.stdout + out.stderr
    code, output, _ = _served({"nproc": nproc, "script": script, "argv": list(argv)}, timeout, merged=True)
    return code, output


def _served(job: dict, timeout: float, merged: bool) -> tuple[int, str, str]:
    """Run `job` on the rank server -> (first non-zero exit code or 0, stdout, stderr); merged: one stream."""
    with tempfile.NamedTemporaryFile(suffix=".out") as out, tempfile.NamedTemporaryFile(suffix=".err") as err:
        result = _RankServer.request({**job, "env": dict(os.environ), "cwd": ROOT, "port": free_port(),
                                      "log": out.name, "err": out.name if merged else err.name, "timeout": timeout})
        texts = [open(f.name, errors="replace").read() for f in (out, err)]
    if result["timed_out"]:
        raise subprocess.TimeoutExpired([job.get("script") or job["module"], *job["argv"]], timeout, texts[0])
    return next((code for code in result["codes"] if code != 0), 0), *texts


def megagrow_cli(argv, timeout: float = 600) -> subprocess.CompletedProcess:
    """`megagrow ARGV` (python -m megagrow.cli) as its own process, forked from the rank server, so that it starts
    with torch and megatron-core already imported (a fresh interpreter spends most of a small command's time
    importing them); stdout and stderr apart."""
    code, out, err = _served({"nproc": 1, "module": "megagrow.cli", "argv": [str(a) for a in argv]}, timeout,
                             merged=False)
    return subprocess.CompletedProcess(["megagrow", *argv], code, out, err)


def pretrain_job(nproc: int, argv: list[str], metrics_file, timeout: int = 300, real: bool = False) -> Run:
    """pretrain_gpt.py ARGV on `nproc` ranks (see ranks()), its metrics file read back."""
    returncode, output = ranks(nproc, "pretrain_gpt.py", [*argv, "--metrics-file", str(metrics_file)], timeout, real)
    metrics = [json.loads(l) for l in open(metrics_file)] if os.path.exists(metrics_file) else []
    return Run(returncode, output, metrics)


BPE_VOCAB = 600
BPE_EOD = "<|endoftext|>"


@pytest.fixture(scope="session")
def bpe_corpus(tmp_path_factory):
    """megagrow's own source files, one document each, as JSONL (corpus.jsonl in the returned folder)."""
    import glob
    d = tmp_path_factory.mktemp("bpe")
    files = sorted(glob.glob(os.path.join(ROOT, "megagrow", "**", "*.py"), recursive=True))
    with open(d / "corpus.jsonl", "w") as f:
        for path in files:
            f.write(json.dumps({"text": open(path, encoding="utf-8").read()}) + "\n")
    return d


@pytest.fixture(scope="session")
def bpe(bpe_corpus):
    """A byte-level BPE trained on the corpus (the `tokenizers` library), saved (a) as a Hugging Face tokenizer
    directory and (b) as GPT-2's vocab.json and merges.txt: {"hf": dir, "vocab": path, "merges": path}."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast
    docs = [json.loads(line)["text"] for line in open(bpe_corpus / "corpus.jsonl")]
    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(docs, vocab_size=BPE_VOCAB, min_frequency=2, special_tokens=[BPE_EOD],
                            show_progress=False)
    assert tok.get_vocab_size() == BPE_VOCAB
    (bpe_corpus / "gpt2").mkdir()
    vocab, merges = tok.save_model(str(bpe_corpus / "gpt2"))
    PreTrainedTokenizerFast(tokenizer_object=tok._tokenizer, eos_token=BPE_EOD, bos_token=BPE_EOD,
                            unk_token=BPE_EOD).save_pretrained(str(bpe_corpus / "hf"))
    return {"hf": str(bpe_corpus / "hf"), "vocab": vocab, "merges": merges}
