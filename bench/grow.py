"""Benchmark: grow a >= 1B-parameter torch_dist checkpoint (TP=2 PP=2) 2x in depth with G_stack.

`megagrow checkpoint grow --op stack:g=2` (to TP=2 PP=4, 48 layers) against plain copies of the same
number of bytes as its output (the source copied twice), in alternating rounds of one run. Speed is
the copies' seconds over the grow's; memory is the grow's peak RSS over the source's bytes (the
small model). By default stacking copies stored chunks under their new layer indices; --rechunk
measures the streaming path every operator can take. The last line of output is one JSON object.

  python bench/grow.py [--workdir DIR] [--rounds 3] [--rechunk] [--with-optimizer]
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
    p.add_argument("--rechunk", action="store_true", help="measure the streaming writer instead of the chunk copy")
    a = p.parse_args()
    work = a.workdir or tempfile.mkdtemp(prefix="megagrow-bench-")
    os.makedirs(work, exist_ok=True)
    src, out = os.path.join(work, "src_tp2pp2"), os.path.join(work, "stacked")
    try:
        n_params, size = build_source(a, src)
        figures = against_copy(a.rounds, src, 2, [
            sys.executable, "-m", "megagrow.cli", "checkpoint", "grow", "--load", src, "--save", out,
            "--op", "stack:g=2", "--target-pp", "4", "--quiet", *(["--rechunk"] if a.rechunk else [])],
            out, work, "grow")
    finally:
        if a.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({"parameters": n_params, "source_bytes": size, "with_optimizer": a.with_optimizer,
                      "rechunk": a.rechunk, **figures,
                      "peak_rss_vs_model": round(figures["peak_rss_bytes"] / size, 3)}))


if __name__ == "__main__":
    main()
