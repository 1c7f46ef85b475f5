"""Tokenize JSONL into Megatron's indexed dataset: {output_prefix}_{key}_document.bin/.idx.

Flags as Megatron-LM's tools/preprocess_data.py; written with megatron-core's IndexedDatasetBuilder.
Outputs are written under temporary names and renamed at the end, so an interrupted run leaves
nothing half-written under the final names.
"""

import argparse
import json
import multiprocessing
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_tokenizer = None


def _init_worker(tokenizer_type, tokenizer_model, vocab_size):
    global _tokenizer
    from megagrow.data.tokenizer import build_tokenizer
    _tokenizer = build_tokenizer(tokenizer_type, tokenizer_model, vocab_size)


def _encode(job):
    line, keys, append_eod = job
    doc = json.loads(line)
    out = {}
    for key in keys:
        ids = _tokenizer.tokenize(doc[key])
        out[key] = ids + [_tokenizer.eod] if append_eod else ids
    return out, len(line)


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--input", required=True)
    p.add_argument("--output-prefix", required=True)
    p.add_argument("--json-keys", nargs="+", default=["text"])
    p.add_argument("--tokenizer-type", choices=["SentencePieceTokenizer", "NullTokenizer"],
                   default="SentencePieceTokenizer")
    p.add_argument("--tokenizer-model", default=None)
    p.add_argument("--vocab-size", type=int, default=None)
    p.add_argument("--append-eod", action="store_true")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--log-interval", type=int, default=1000)
    a = p.parse_args()
    if not os.path.isfile(a.input):
        sys.exit(f"error: input not found: {a.input}")
    try:
        _init_worker(a.tokenizer_type, a.tokenizer_model, a.vocab_size)
    except (FileNotFoundError, ValueError, TypeError) as e:
        sys.exit(f"error: {e}")

    import numpy as np
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    dtype = np.uint16 if _tokenizer.vocab_size < 65500 else np.int32
    finals = {k: f"{a.output_prefix}_{k}_document" for k in a.json_keys}
    builders = {k: IndexedDatasetBuilder(finals[k] + ".bin.tmp", dtype=dtype) for k in a.json_keys}
    os.makedirs(os.path.dirname(os.path.abspath(a.output_prefix)), exist_ok=True)

    t0, nbytes, ndocs = time.time(), 0, 0
    with open(a.input) as f:
        jobs = ((line, a.json_keys, a.append_eod) for line in f if line.strip())
        if a.workers > 1:
            pool = multiprocessing.Pool(a.workers, _init_worker, (a.tokenizer_type, a.tokenizer_model, a.vocab_size))
            results = pool.imap(_encode, jobs, chunksize=16)
        else:
            results = map(_encode, jobs)
        for doc, size in results:
            for key, ids in doc.items():
                builders[key].add_item(torch.tensor(ids, dtype=torch.int64))
                builders[key].end_document()
            ndocs, nbytes = ndocs + 1, nbytes + size
            if ndocs % a.log_interval == 0:
                print(f"processed {ndocs} documents ({nbytes / 1e6 / (time.time() - t0):.2f} MB/s)", flush=True)
    for key, builder in builders.items():
        builder.finalize(finals[key] + ".idx.tmp")
        os.replace(finals[key] + ".bin.tmp", finals[key] + ".bin")
        os.replace(finals[key] + ".idx.tmp", finals[key] + ".idx")
        print(f"wrote {finals[key]}.bin/.idx: {ndocs} documents in {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
