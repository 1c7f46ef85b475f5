"""Data for a run from nothing: a JSONL corpus (default: the embedded stdlib corpus), a sentencepiece
tokenizer trained on it and Megatron's indexed dataset, each built only if absent (the tools' steps)."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _tool(*argv: str) -> None:
    out = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed: {(out.stderr or out.stdout).strip().splitlines()[-1]}")


def prepare_data(out_dir: str, jsonl: str | None = None, vocab_size: int = 4096, progress=print) -> dict:
    """Returns the Megatron data flags ({data_path, tokenizer_type, tokenizer_model}) for `out_dir`."""
    os.makedirs(out_dir, exist_ok=True)
    corpus = jsonl or os.path.join(out_dir, "corpus.jsonl")
    if jsonl is None and not os.path.exists(corpus):
        progress("data: writing the embedded corpus (the Python standard library's source)")
        _tool("tools/prepare_stdlib_corpus.py", "--output", corpus)
    elif not os.path.isfile(corpus):
        raise FileNotFoundError(f"corpus not found: {corpus}")
    model = os.path.join(out_dir, "tokenizer.model")
    if not os.path.exists(model):
        progress(f"data: training a {vocab_size}-piece sentencepiece tokenizer")
        _tool("tools/train_tokenizer.py", "--input", corpus, "--model-prefix", model[:-len(".model")],
              "--vocab-size", str(vocab_size))
    prefix = os.path.join(out_dir, "corpus")
    if not os.path.exists(prefix + "_text_document.idx"):
        progress("data: building the indexed dataset")
        _tool("tools/preprocess_data.py", "--input", corpus, "--output-prefix", prefix, "--tokenizer-type",
              "GPTSentencePieceTokenizer", "--tokenizer-model", model, "--append-eod", "--workers", "2")
    return {"data_path": prefix + "_text_document", "tokenizer_type": "GPTSentencePieceTokenizer",
            "tokenizer_model": model, "data_cache_path": os.path.join(out_dir, "cache")}
