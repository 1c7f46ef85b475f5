"""Write the embedded default corpus (the Python standard library's own source files) as JSONL.

    python tools/prepare_stdlib_corpus.py --output data/corpus.jsonl [--max-bytes 1500000]

The whole stdlib (~600 files, ~11 MB on CPython 3.11) is the default: corpus, tokenizer and
preprocessing together take well under a minute on 2 cores, so no cap is needed.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True, help="JSONL file to write")
    p.add_argument("--max-bytes", type=int, default=None,
                   help="stop once this much text is written (default: the whole stdlib)")
    a = p.parse_args(argv)
    from megagrow.data.corpus import write_stdlib_corpus

    t0 = time.time()
    docs = write_stdlib_corpus(a.output, a.max_bytes)
    size = os.path.getsize(a.output)
    print(f"wrote {docs} documents, {size / 1e6:.1f} MB of JSONL to {a.output} in {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    from megagrow.entry import guarded
    sys.exit(guarded(main))
