"""Benchmark: convert a >= 1B-parameter torch_dist checkpoint from TP=2 PP=2 to TP=1 PP=4.

Builds the source checkpoint (Llama-style, random weights, written by megagrow's streaming
torch_dist writer), then alternates, in the same run on the same files: a plain copy of the source
directory (shutil.copytree) and `megagrow checkpoint convert` in a child process whose resident
memory is sampled. By default convert copies torch_dist chunks byte for byte; --rechunk measures
the streaming writer (every tensor read, re-split and re-serialised) instead. Reports the convert speed as a ratio to the copy (bytes/s over bytes/s: the
copy's seconds over the convert's) and its peak RSS as a ratio to the checkpoint's tensor bytes.
The last line of output is one JSON object.

  python bench/checkpoint_convert.py [--workdir DIR] [--rounds 2] [--num-layers 24 --hidden-size 2048]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import psutil  # noqa: E402
import torch  # noqa: E402

from megagrow.checkpoint.convert import directory_bytes, write_checkpoint  # noqa: E402
from megagrow.checkpoint.view import CheckpointView, OptimizerCommon, expected_shapes, parameter_count  # noqa: E402

def run_sampling_rss(cmd: list[str]) -> tuple[subprocess.CompletedProcess, int]:
    """Run cmd, sampling its resident set every 10 ms; returns (result, peak RSS bytes).

    Sampled rather than read from getrusage: a child's ru_maxrss starts from its parent's
    resident size at fork, which here would be the builder's."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "2"})
    ps, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            peak = max(peak, ps.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.01)
    out, err = proc.communicate()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), peak


class RandomView(CheckpointView):
    """A checkpoint of random weights, generated per unit from (seed, unit) so that it is never whole."""

    def _unit(self, shapes: dict, seed: int):
        g = torch.Generator().manual_seed(seed)
        states = ("model",) + self.optimizer_states
        return {st: {n: torch.randn(s, generator=g) * 0.02 for n, s in shapes.items()} for st in states}

    def read_globals(self):
        return self._unit(expected_shapes(self.args)[0], 0)

    def read_layer(self, index: int):
        return self._unit(expected_shapes(self.args)[1], index + 1)


def model_args(a) -> argparse.Namespace:
    return argparse.Namespace(
        num_layers=a.num_layers, hidden_size=a.hidden_size, ffn_hidden_size=a.ffn_hidden_size,
        num_attention_heads=a.num_attention_heads, group_query_attention=True, num_query_groups=a.num_query_groups,
        kv_channels=None, swiglu=True, normalization="RMSNorm", position_embedding_type="rope",
        untie_embeddings_and_output_weights=True, add_bias_linear=False, max_position_embeddings=4096,
        padded_vocab_size=32000, tokenizer_vocab_size=32000, make_vocab_size_divisible_by=128,
        tensor_model_parallel_size=2, pipeline_model_parallel_size=2, data_parallel_size=1, world_size=4,
        ckpt_format="torch_dist", transformer_impl="local", seed=1234, use_distributed_optimizer=a.with_optimizer)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default=None, help="where the checkpoints go (default: a temporary directory)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--num-layers", type=int, default=24)
    p.add_argument("--hidden-size", type=int, default=2048)
    p.add_argument("--ffn-hidden-size", type=int, default=5632)
    p.add_argument("--num-attention-heads", type=int, default=16)
    p.add_argument("--num-query-groups", type=int, default=4)
    p.add_argument("--with-optimizer", action="store_true", help="include distributed-optimizer Adam state")
    p.add_argument("--rechunk", action="store_true",
                   help="measure the streaming writer (convert --rechunk) instead of the chunk copy")
    a = p.parse_args()
    work = a.workdir or tempfile.mkdtemp(prefix="megagrow-bench-")
    os.makedirs(work, exist_ok=True)
    src, copy_dst, conv_dst = (os.path.join(work, n) for n in ("src_tp2pp2", "copy", "tp1pp4"))
    try:
        args = model_args(a)
        n_params = parameter_count(args)
        optimizer = OptimizerCommon([{"lr": 1e-4, "weight_decay": 0.1}, {"lr": 1e-4, "weight_decay": 0.0}], 100.0,
                                    distributed=True) if a.with_optimizer else None
        view = RandomView(args, iteration=100, optimizer=optimizer)
        print(f"building a {n_params / 1e9:.2f}B-parameter checkpoint at TP=2 PP=2 in {src}", flush=True)
        t0 = time.time()
        shutil.rmtree(src, ignore_errors=True)
        write_checkpoint(view, src, args, "torch_dist", with_optimizer=a.with_optimizer)
        size = directory_bytes(src)
        print(f"built {size / 1e9:.2f} GB in {time.time() - t0:.1f} s", flush=True)

        copies, converts, rss = [], [], []
        for r in range(a.rounds):
            shutil.rmtree(copy_dst, ignore_errors=True)
            os.sync()  # each side starts with no dirty pages of the other and pays for its own writeback
            t0 = time.time()
            shutil.copytree(src, copy_dst)
            os.sync()
            copies.append(time.time() - t0)
            shutil.rmtree(copy_dst)

            shutil.rmtree(conv_dst, ignore_errors=True)
            os.sync()
            t0 = time.time()
            out, peak = run_sampling_rss([sys.executable, "-m", "megagrow.cli", "checkpoint", "convert", "--load", src,
                                          "--save", conv_dst, "--target-tp", "1", "--target-pp", "4", "--quiet",
                                          *(["--rechunk"] if a.rechunk else [])])
            os.sync()
            converts.append(time.time() - t0)
            if out.returncode != 0:
                raise SystemExit(f"convert failed:\n{out.stdout}\n{out.stderr}")
            rss.append(peak)
            shutil.rmtree(conv_dst)
            print(f"round {r + 1}: copy {copies[-1]:.1f} s ({size / copies[-1] / 1e9:.2f} GB/s), convert "
                  f"{converts[-1]:.1f} s ({size / converts[-1] / 1e9:.2f} GB/s), peak RSS {rss[-1] / 1e9:.2f} GB",
                  flush=True)
    finally:
        if a.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    copy_s, convert_s = sorted(copies)[len(copies) // 2], sorted(converts)[len(converts) // 2]  # medians
    print(json.dumps({
        "parameters": n_params, "checkpoint_bytes": size, "with_optimizer": a.with_optimizer, "rechunk": a.rechunk,
        "copy_seconds": round(copy_s, 2), "convert_seconds": round(convert_s, 2),
        "copy_bytes_per_s": round(size / copy_s), "convert_bytes_per_s": round(size / convert_s),
        "speed_vs_copy": round(copy_s / convert_s, 3),
        "peak_rss_bytes": max(rss), "peak_rss_vs_model": round(max(rss) / size, 3)}))


if __name__ == "__main__":
    main()
