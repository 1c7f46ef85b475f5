"""Train a sentencepiece BPE tokenizer on a JSONL corpus ({"text": ...} per line)."""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megagrow.data.tokenizer import train_sentencepiece  # noqa: E402

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--input", required=True)
    p.add_argument("--model-prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
    p.add_argument("--vocab-size", type=int, default=4096)
    a = p.parse_args()
    if not os.path.isfile(a.input):
        sys.exit(f"error: input not found: {a.input}")
    t0 = time.time()
    path = train_sentencepiece(a.input, a.model_prefix, a.vocab_size)
    print(f"trained tokenizer {path} (vocab {a.vocab_size}) in {time.time() - t0:.1f} s")
