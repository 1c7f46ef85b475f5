"""Tokenize a JSONL corpus into Megatron's indexed dataset: {output_prefix}_{key}_document.bin/.idx.

Flags as Megatron-LM's tools/preprocess_data.py (its tokenizer flags are the trainer's, and every
--tokenizer-type megagrow trains with is read the same way here); one document per JSON line, written with
megatron-core's IndexedDatasetBuilder, so megatron-core's IndexedDataset/GPTDataset read it back.
Outputs are written under temporary names and renamed at the end (.idx last), so an interrupted run
leaves nothing half-written under the final names.

    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus \\
        --tokenizer-type GPTSentencePieceTokenizer --tokenizer-model tok.model --append-eod --workers 2
    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus \\
        --tokenizer-type GPT2BPETokenizer --vocab-file vocab.json --merge-file merges.txt --append-eod --workers 2
"""

import argparse
import json
import multiprocessing
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_tokenizer = None  # one per process: built in the main process and in each pool worker


def _init_tokenizer(flags: dict):
    global _tokenizer
    from megagrow.data.tokenizer import build_tokenizer
    _tokenizer = build_tokenizer(**flags)


def _encode(job):
    """(input path, line number, JSON line, keys, append_eod) -> ({key: ids}, bytes of the line)."""
    path, lineno, line, keys, append_eod = job
    try:
        doc = json.loads(line)
        texts = {key: doc[key] for key in keys}
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path}:{lineno}: not a JSON object with keys {keys} ({type(e).__name__}: {e})")
    ids = {}
    for key, text in texts.items():
        ids[key] = _tokenizer.tokenize(text) + ([_tokenizer.eod] if append_eod else [])
    return ids, len(line.encode("utf-8"))


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="JSONL file, one document per line")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX_{key}_document.bin/.idx")
    p.add_argument("--json-keys", nargs="+", default=["text"], help="keys to tokenize (default: text)")
    from megagrow.data.tokenizer import add_tokenizer_args
    add_tokenizer_args(p.add_argument_group("tokenizer"))
    p.set_defaults(tokenizer_type="GPTSentencePieceTokenizer")
    p.add_argument("--append-eod", action="store_true", help="end every document with the eod id")
    p.add_argument("--workers", type=int, default=1, help="tokenizing processes (order is kept)")
    p.add_argument("--log-interval", type=int, default=100, help="report progress every N documents")
    return p.parse_args(argv)


def preprocess(a) -> None:
    if not os.path.isfile(a.input):
        raise FileNotFoundError(f"input not found: {a.input}")
    if a.workers < 1:
        raise ValueError(f"--workers must be at least 1, not {a.workers}")
    from megagrow.data.tokenizer import tokenizer_flags
    flags = tokenizer_flags(a)
    _init_tokenizer(flags)

    import numpy as np
    import torch
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    # uint16 when every id fits (vocab < 65500), else int32: megatron-core's own rule.
    dtype = DType.optimal_dtype(_tokenizer.vocab_size)
    vocab_size = _tokenizer.vocab_size
    os.makedirs(os.path.dirname(os.path.abspath(a.output_prefix)), exist_ok=True)
    finals = {key: f"{a.output_prefix}_{key}_document" for key in a.json_keys}
    tmp = {key: f"{final}.{os.getpid()}.tmp" for key, final in finals.items()}
    builders = {}
    pool = None
    try:
        for key in a.json_keys:
            builders[key] = IndexedDatasetBuilder(tmp[key] + ".bin", dtype=dtype)
        t0, nbytes, ndocs, ntokens = time.time(), 0, 0, 0
        with open(a.input, encoding="utf-8") as f:
            jobs = ((a.input, i, line, a.json_keys, a.append_eod) for i, line in enumerate(f, 1) if line.strip())
            if a.workers > 1:
                pool = multiprocessing.Pool(a.workers, _init_tokenizer, (flags,))
                results = pool.imap(_encode, jobs, chunksize=4)  # imap keeps the input order
            else:
                results = map(_encode, jobs)
            for doc, size in results:
                for key, ids in doc.items():
                    ids = torch.tensor(ids, dtype=torch.int64)
                    # A NullTokenizer input can hold any integer; out-of-range ids would wrap silently.
                    if len(ids) and (ids.min() < 0 or ids.max() >= vocab_size):
                        raise ValueError(f"document {ndocs + 1}: token id out of range [0, {vocab_size})")
                    builders[key].add_item(ids)
                    builders[key].end_document()
                    ntokens += len(ids)
                ndocs, nbytes = ndocs + 1, nbytes + size
                if ndocs % a.log_interval == 0:
                    dt = time.time() - t0
                    print(f"processed {ndocs} documents ({nbytes / 1e6 / dt:.2f} MB/s)", flush=True)
        for key, builder in builders.items():
            builder.finalize(tmp[key] + ".idx")
        # .idx last: a reader (and examples/quickstart.sh) takes a present .idx to mean a complete pair.
        for key, final in finals.items():
            if os.path.exists(final + ".idx"):
                os.remove(final + ".idx")
            os.replace(tmp[key] + ".bin", final + ".bin")
            os.replace(tmp[key] + ".idx", final + ".idx")
        dt = time.time() - t0
        print(f"wrote {', '.join(f + '.bin/.idx' for f in finals.values())}: {ndocs} documents, "
              f"{ntokens} tokens ({np.dtype(dtype).name}), {nbytes / 1e6:.1f} MB in {dt:.1f} s "
              f"({nbytes / 1e6 / max(dt, 1e-9):.2f} MB/s)")
    finally:
        if pool is not None:
            pool.terminate()
        for builder in builders.values():
            builder.data_file.close()
        for path in tmp.values():
            for ext in (".bin", ".idx"):
                if os.path.exists(path + ext):
                    os.remove(path + ext)


def main(argv=None) -> int:
    a = get_args(argv)
    try:
        preprocess(a)
    except (FileNotFoundError, ValueError) as e:  # bad input (TokenizerError included): one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    from megagrow.entry import guarded
    sys.exit(guarded(main))
