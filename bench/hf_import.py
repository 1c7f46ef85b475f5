"""Benchmark: import a >= 1B-parameter Llama-shaped Hugging Face model to TP=2 PP=2 and export it back.

Builds the source (TinyLlama-1.1B's shape by default, random weights, sharded safetensors written by megagrow's
exporter), then alternates, in the same run on the same files (5 rounds), a plain copy of the model directory
(shutil.copytree: the same bytes) with `megagrow checkpoint convert --load HF --target-tp 2 --target-pp 2` (import,
to torch_dist) and with `megagrow checkpoint export` of that import (export), each in a child process whose
resident memory is sampled. Speed is the copy's seconds over the tool's (the median of the rounds' ratios); memory
is the tool's peak RSS over the model's bytes. The last line of output is one JSON object.

  python bench/hf_import.py [--workdir DIR] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import torch

from _common import RandomView, against_copy, run_sampling_rss

from megagrow.checkpoint.hf_stream import write_hf
from megagrow.checkpoint.io import directory_bytes
from megagrow.model.shape import parameter_count


def build_hf(a, path: str) -> tuple[int, int]:
    """A random Llama-shaped Hugging Face model directory; returns (parameters, bytes)."""
    args = argparse.Namespace(
        num_layers=a.num_layers, hidden_size=a.hidden_size, ffn_hidden_size=a.ffn_hidden_size,
        num_attention_heads=a.num_attention_heads, group_query_attention=True, num_query_groups=a.num_query_groups,
        kv_channels=None, swiglu=True, normalization="RMSNorm", position_embedding_type="rope", rotary_base=10000,
        untie_embeddings_and_output_weights=True, add_bias_linear=False, max_position_embeddings=2048,
        padded_vocab_size=32000, tokenizer_vocab_size=32000, layernorm_epsilon=1e-5)
    n = parameter_count(args)
    print(f"building a {n / 1e9:.2f}B-parameter Hugging Face model in {path}", flush=True)
    t0 = time.time()
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    view = RandomView(args, iteration=0)
    view.dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[a.dtype]
    write_hf(view, path, "llama", 5 * 10**9)  # transformers' default shard size
    size = directory_bytes(path)
    print(f"built {size / 1e9:.2f} GB in {time.time() - t0:.1f} s", flush=True)
    return n, size


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default=None, help="where the models go (default: a temporary directory)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--num-layers", type=int, default=32)
    p.add_argument("--hidden-size", type=int, default=4096)
    p.add_argument("--ffn-hidden-size", type=int, default=11008)
    p.add_argument("--num-attention-heads", type=int, default=32)
    p.add_argument("--num-query-groups", type=int, default=32)
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    a = p.parse_args()
    work = a.workdir or tempfile.mkdtemp(prefix="megagrow-bench-")
    os.makedirs(work, exist_ok=True)
    hf, meg, back = (os.path.join(work, n) for n in ("hf", "tp2pp2", "hf_back"))
    cli = [sys.executable, "-m", "megagrow.cli", "checkpoint"]
    importing = cli + ["convert", "--load", hf, "--save", meg, "--target-tp", "2", "--target-pp", "2", "--quiet"]
    try:
        n_params, size = build_hf(a, hf)
        imported = against_copy(a.rounds, hf, 1, importing, meg, work, "import")
        result, _ = run_sampling_rss(importing)  # the checkpoint export reads
        if result.returncode != 0:
            raise SystemExit(f"import failed:\n{result.stderr}")
        exported = against_copy(a.rounds, hf, 1, cli + ["export", "--load", meg, "--save", back, "--quiet"], back,
                                work, "export")
    finally:
        if a.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({"parameters": n_params, "model_bytes": size,
                      "import_seconds": imported["import_seconds"], "export_seconds": exported["export_seconds"],
                      "copy_seconds": imported["copy_seconds"],
                      "import_speed_vs_copy": imported["speed_vs_copy"],
                      "export_speed_vs_copy": exported["speed_vs_copy"],
                      "peak_rss_vs_model": round(max(imported["peak_rss_bytes"], exported["peak_rss_bytes"]) / size,
                                                 3)}))


if __name__ == "__main__":
    main()
