"""Benchmark: convert a >= 1B-parameter torch_dist checkpoint from TP=2 PP=2 to TP=1 PP=4.

Builds the source checkpoint (Llama-style, random weights, written by megagrow's streaming
torch_dist writer), then alternates, in the same run on the same files: a plain copy of the source
directory (shutil.copytree) and `megagrow checkpoint convert` in a child process whose resident
memory is sampled. By default convert copies torch_dist chunks byte for byte; --rechunk measures
the streaming writer (every tensor read, re-split and re-serialised) instead. Speed is the copy's
seconds over the convert's (the same bytes); memory is peak RSS over the checkpoint's bytes.
The last line of output is one JSON object.

  python bench/checkpoint_convert.py [--workdir DIR] [--rounds 3] [--rechunk] [--with-optimizer]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

from _common import add_model_flags, against_copy, build_source


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_flags(p)
    p.add_argument("--rechunk", action="store_true",
                   help="measure the streaming writer (convert --rechunk) instead of the chunk copy")
    a = p.parse_args()
    work = a.workdir or tempfile.mkdtemp(prefix="megagrow-bench-")
    os.makedirs(work, exist_ok=True)
    src, out = os.path.join(work, "src_tp2pp2"), os.path.join(work, "tp1pp4")
    try:
        n_params, size = build_source(a, src)
        figures = against_copy(a.rounds, src, 1, [
            sys.executable, "-m", "megagrow.cli", "checkpoint", "convert", "--load", src, "--save", out,
            "--target-tp", "1", "--target-pp", "4", "--quiet", *(["--rechunk"] if a.rechunk else [])],
            out, work, "convert")
    finally:
        if a.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({"parameters": n_params, "checkpoint_bytes": size, "with_optimizer": a.with_optimizer,
                      "rechunk": a.rechunk, **figures,
                      "peak_rss_vs_model": round(figures["peak_rss_bytes"] / size, 3)}))


if __name__ == "__main__":
    main()
