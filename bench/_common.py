"""Shared by the checkpoint benchmarks: a >= 1B random-weight checkpoint, and a tool timed against a
plain copy of the same number of bytes, in alternating rounds, with the tool's resident memory sampled."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import psutil  # noqa: E402
import torch  # noqa: E402

from megagrow.checkpoint.io import directory_bytes, write_checkpoint  # noqa: E402
from megagrow.checkpoint.view import CheckpointView, OptimizerCommon  # noqa: E402
from megagrow.model.shape import expected_shapes, parameter_count  # noqa: E402


def add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", default=None, help="where the checkpoints go (default: a temporary directory)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--num-layers", type=int, default=24)
    p.add_argument("--hidden-size", type=int, default=2048)
    p.add_argument("--ffn-hidden-size", type=int, default=5632)
    p.add_argument("--num-attention-heads", type=int, default=16)
    p.add_argument("--num-query-groups", type=int, default=4)
    p.add_argument("--with-optimizer", action="store_true", help="include distributed-optimizer Adam state")


class RandomView(CheckpointView):
    """A checkpoint of random weights, generated per unit from (seed, unit) so that it is never whole."""

    dtype = torch.float32  # of the model's tensors (optimizer states stay fp32)

    def _unit(self, shapes: dict, seed: int):
        g = torch.Generator().manual_seed(seed)
        states = ("model",) + self.optimizer_states
        return {st: {n: (torch.randn(s, generator=g) * 0.02).to(self.dtype if st == "model" else torch.float32)
                     for n, s in shapes.items()} for st in states}

    def read_globals(self):
        return self._unit(expected_shapes(self.args)[0], 0)

    def read_layer(self, index: int):
        return self._unit(expected_shapes(self.args)[1], index + 1)


def build_source(a, path: str) -> tuple[int, int]:
    """Write a Llama-style random checkpoint at TP=2 PP=2; returns (parameters, bytes)."""
    args = argparse.Namespace(
        num_layers=a.num_layers, hidden_size=a.hidden_size, ffn_hidden_size=a.ffn_hidden_size,
        num_attention_heads=a.num_attention_heads, group_query_attention=True, num_query_groups=a.num_query_groups,
        kv_channels=None, swiglu=True, normalization="RMSNorm", position_embedding_type="rope",
        untie_embeddings_and_output_weights=True, add_bias_linear=False, max_position_embeddings=4096,
        padded_vocab_size=32000, tokenizer_vocab_size=32000, make_vocab_size_divisible_by=128,
        tensor_model_parallel_size=2, pipeline_model_parallel_size=2, data_parallel_size=1, world_size=4,
        ckpt_format="torch_dist", transformer_impl="local", seed=1234, use_distributed_optimizer=a.with_optimizer)
    optimizer = OptimizerCommon([{"lr": 1e-4, "weight_decay": 0.1}, {"lr": 1e-4, "weight_decay": 0.0}], 100.0,
                                distributed=True) if a.with_optimizer else None
    n_params = parameter_count(args)
    print(f"building a {n_params / 1e9:.2f}B-parameter checkpoint at TP=2 PP=2 in {path}", flush=True)
    t0 = time.time()
    shutil.rmtree(path, ignore_errors=True)
    write_checkpoint(RandomView(args, iteration=100, optimizer=optimizer), path, args, "torch_dist",
                     with_optimizer=a.with_optimizer, progress=False)
    size = directory_bytes(path)
    print(f"built {size / 1e9:.2f} GB in {time.time() - t0:.1f} s", flush=True)
    return n_params, size


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


def against_copy(rounds: int, src: str, copies: int, tool: list[str], out: str, work: str, label: str) -> dict:
    """Alternate `copies` plain copies of src (as many bytes as the tool writes) with the tool writing
    `out`; each side starts with no dirty pages and pays for its own writeback. Medians of the rounds."""
    copy_s, tool_s, rss, out_bytes = [], [], [], 0
    for r in range(rounds):
        os.sync()
        t0 = time.time()
        for i in range(copies):
            shutil.copytree(src, os.path.join(work, f"copy{i}"))
        os.sync()
        copy_s.append(time.time() - t0)
        for i in range(copies):
            shutil.rmtree(os.path.join(work, f"copy{i}"))

        shutil.rmtree(out, ignore_errors=True)
        os.sync()
        t0 = time.time()
        result, peak = run_sampling_rss(tool)
        os.sync()
        tool_s.append(time.time() - t0)
        if result.returncode != 0:
            raise SystemExit(f"{label} failed:\n{result.stdout}\n{result.stderr}")
        rss.append(peak)
        out_bytes = directory_bytes(out)
        shutil.rmtree(out)
        print(f"round {r + 1}: copy {copy_s[-1]:.1f} s, {label} {tool_s[-1]:.1f} s "
              f"({out_bytes / tool_s[-1] / 1e9:.2f} GB/s), peak RSS {rss[-1] / 1e9:.2f} GB", flush=True)
    median = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    # Each round's copy and tool run back to back, so their ratio is taken per round: this disk's speed drifts
    # between rounds (copies of the same bytes took 1.8-5.9 s in one run) more than within one.
    return {"copy_seconds": round(median(copy_s), 2), f"{label}_seconds": round(median(tool_s), 2),
            "output_bytes": out_bytes, f"{label}_bytes_per_s": round(out_bytes / median(tool_s)),
            "speed_vs_copy": round(median([c / t for c, t in zip(copy_s, tool_s)]), 3), "peak_rss_bytes": max(rss)}


def bench_main(doc: str, label: str, copies: int, out_name: str, tool_argv) -> None:
    """Parse the common flags, build the source, time `megagrow <tool_argv(src, out)>` against copies,
    print the figures' JSON line (peak RSS relative to the source checkpoint's bytes)."""
    import json
    import tempfile
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    add_model_flags(p)
    p.add_argument("--rechunk", action="store_true", help="measure the streaming writer instead of the chunk copy")
    a = p.parse_args()
    work = a.workdir or tempfile.mkdtemp(prefix="megagrow-bench-")
    os.makedirs(work, exist_ok=True)
    src, out = os.path.join(work, "src_tp2pp2"), os.path.join(work, out_name)
    try:
        n_params, size = build_source(a, src)
        tool = [sys.executable, "-m", "megagrow.cli", *tool_argv(src, out), "--quiet",
                *(["--rechunk"] if a.rechunk else [])]
        figures = against_copy(a.rounds, src, copies, tool, out, work, label)
    finally:
        if a.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({"parameters": n_params, "source_bytes": size, "with_optimizer": a.with_optimizer,
                      "rechunk": a.rechunk, **figures,
                      "peak_rss_vs_model": round(figures["peak_rss_bytes"] / size, 3)}))
