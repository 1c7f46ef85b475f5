"""Benchmark: grow a >= 1B-parameter torch_dist checkpoint (TP=2 PP=2) 2x in depth with G_stack.

`megagrow checkpoint grow --op stack:g=2` (to TP=2 PP=4, 48 layers) against plain copies of the same
number of bytes as its output (the source copied twice), in alternating rounds of one run. Speed is
the copies' seconds over the grow's; memory is the grow's peak RSS over the source's bytes (the
small model). By default stacking copies stored chunks under their new layer indices; --rechunk
measures the streaming path every operator can take. The last line of output is one JSON object.

  python bench/grow.py [--workdir DIR] [--rounds 5] [--rechunk] [--with-optimizer]
"""

from __future__ import annotations

from _common import bench_main

if __name__ == "__main__":
    bench_main(__doc__, "grow", 2, "stacked",
               lambda src, out: ["checkpoint", "grow", "--load", src, "--save", out, "--op", "stack:g=2",
                                 "--target-pp", "4"])
