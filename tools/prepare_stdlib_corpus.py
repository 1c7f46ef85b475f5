"""Write the embedded default corpus (the Python stdlib's source files) as JSONL."""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megagrow.data.corpus import write_stdlib_corpus  # noqa: E402

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--output", required=True, help="JSONL file to write")
    p.add_argument("--max-bytes", type=int, default=None, help="stop after this much text")
    a = p.parse_args()
    os.makedirs(os.path.dirname(os.path.abspath(a.output)), exist_ok=True)
    t0 = time.time()
    docs, size = write_stdlib_corpus(a.output, a.max_bytes)
    print(f"wrote {docs} documents, {size / 1e6:.1f} MB of text to {a.output} in {time.time() - t0:.1f} s")
