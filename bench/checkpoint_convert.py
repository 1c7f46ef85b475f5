"""Benchmark: convert a >= 1B-parameter torch_dist checkpoint from TP=2 PP=2 to TP=1 PP=4.

Builds the source checkpoint (Llama-style, random weights, written by megagrow's streaming
torch_dist writer), then alternates, in the same run on the same files: a plain copy of the source
directory (shutil.copytree) and `megagrow checkpoint convert` in a child process whose resident
memory is sampled. By default convert copies torch_dist chunks byte for byte; --rechunk measures
the streaming writer (every tensor read, re-split and re-serialised) instead. Speed is the copy's
seconds over the convert's (the same bytes); memory is peak RSS over the checkpoint's bytes.
The last line of output is one JSON object.

  python bench/checkpoint_convert.py [--workdir DIR] [--rounds 5] [--rechunk] [--with-optimizer]
"""

from __future__ import annotations

from _common import bench_main

if __name__ == "__main__":
    bench_main(__doc__, "convert", 1, "tp1pp4",
               lambda src, out: ["checkpoint", "convert", "--load", src, "--save", out, "--target-tp", "1", "--target-pp", "4"])
