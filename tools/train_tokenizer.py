"""Train a sentencepiece BPE tokenizer on a JSONL corpus ({"text": ...} per line).

    python tools/train_tokenizer.py --input data/corpus.jsonl --model-prefix data/tok --vocab-size 4096
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="JSONL corpus")
    p.add_argument("--model-prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
    p.add_argument("--vocab-size", type=int, default=4096)
    a = p.parse_args(argv)
    if not os.path.isfile(a.input):
        print(f"error: input not found: {a.input}", file=sys.stderr)
        return 1
    from megagrow.data.tokenizer import train_sentencepiece

    t0 = time.time()
    try:
        path = train_sentencepiece(a.input, a.model_prefix, a.vocab_size)
    except ValueError as e:  # a bad corpus line
        print(f"error: {e}", file=sys.stderr)
        return 1
    except RuntimeError as e:  # sentencepiece's own errors, e.g. "Vocabulary size too high (N)..."
        print(f"error: sentencepiece: {str(e).splitlines()[0]}", file=sys.stderr)
        return 1
    print(f"trained {path} (vocab {a.vocab_size}) in {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    from megagrow.entry import guarded
    sys.exit(guarded(main))
