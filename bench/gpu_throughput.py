"""Training throughput and MFU of pretrain_gpt.py on one GPU node: a ~1B Llama-style model (Llama-3.2-1B's
shape), bf16, Transformer Engine and flash attention when installed, the distributed optimizer with overlapped
gradient reduce and parameter gather, mock data; a few dozen iterations, the first ones not counted.

    python bench/gpu_throughput.py [--gpus N] [--iters 40] [--micro-batch-size 4] [--peak-tflops 989]

MFU is Megatron-LM's FLOPs formula (the trainer's "throughput per GPU") over the GPU's dense bf16 peak.
Last line: {"mfu": ..., "tokens_per_s": ..., ...}. Without a CUDA GPU it says so in one line and exits 0.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Dense bf16 peak per GPU (TFLOP/s), by the name CUDA reports.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0,
               "B200": 2250.0, "GH200": 989.0}
LLAMA_1B = ["--num-layers", "16", "--hidden-size", "2048", "--ffn-hidden-size", "8192", "--num-attention-heads", "32",
            "--group-query-attention", "--num-query-groups", "8", "--swiglu", "--normalization", "RMSNorm",
            "--position-embedding-type", "rope", "--rotary-base", "500000", "--disable-bias-linear",
            "--untie-embeddings-and-output-weights", "--hidden-dropout", "0", "--attention-dropout", "0"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpus", type=int, default=None, help="default: every GPU of the node")
    p.add_argument("--iters", type=int, default=40)
    p.add_argument("--warmup", type=int, default=10, help="iterations not counted")
    p.add_argument("--seq-length", type=int, default=4096)
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--global-batch-size", type=int, default=None, help="default: 16 per GPU")
    p.add_argument("--peak-tflops", type=float, default=None, help="default: the GPU's dense bf16 peak")
    opts = p.parse_args()

    import torch
    if not torch.cuda.is_available():
        print("gpu_throughput: no CUDA GPU on this machine; nothing measured")
        return
    gpus = opts.gpus or torch.cuda.device_count()
    name = torch.cuda.get_device_name(0)
    peak = opts.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    if peak is None:
        sys.exit(f"error: no known bf16 peak for {name}: pass --peak-tflops")
    te = importlib.util.find_spec("transformer_engine") is not None
    work = tempfile.mkdtemp(prefix="megagrow-gpu-bench-")
    gbs = opts.global_batch_size or 16 * gpus
    argv = [*LLAMA_1B, "--seq-length", str(opts.seq_length), "--max-position-embeddings", str(opts.seq_length),
            "--micro-batch-size", str(opts.micro_batch_size), "--global-batch-size", str(gbs),
            "--train-iters", str(opts.iters), "--lr", "3e-4", "--min-lr", "3e-5", "--lr-warmup-iters", "5",
            "--bf16", "--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather",
            "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "128256",
            "--log-interval", "5", "--log-throughput", "--eval-interval", str(opts.iters + 1), "--eval-iters", "0",
            "--metrics-file", f"{work}/metrics.jsonl", "--data-cache-path", f"{work}/cache",
            "--transformer-impl", "transformer_engine" if te else "local"]
    if te:
        argv += ["--attention-backend", "flash"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(gpus), "pretrain_gpt.py", *argv]
    print(f"gpu_throughput: {gpus} x {name}, Transformer Engine {'on' if te else 'not installed'}", flush=True)
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "CUDA_DEVICE_MAX_CONNECTIONS": "1"})
    if out.returncode != 0:
        sys.stderr.write(out.stdout[-3000:] + out.stderr[-3000:])
        sys.exit(f"error: the training run failed (exit {out.returncode})")
    train = [json.loads(l) for l in open(f"{work}/metrics.jsonl")]
    steps = [r for r in train if r["kind"] == "train" and r["iteration"] > opts.warmup]
    step_s = statistics.median(r["step_ms"] for r in steps) / 1e3
    tflops = statistics.median(r["tflops_per_gpu"] for r in steps)
    print(f"median step {step_s * 1e3:.1f} ms over {len(steps)} iterations; {tflops:.1f} TFLOP/s per GPU")
    print(json.dumps({"mfu": round(tflops / peak, 4), "tokens_per_s": round(gbs * opts.seq_length / step_s),
                      "tflops_per_gpu": round(tflops, 1), "peak_tflops": peak, "gpus": gpus, "gpu": name,
                      "transformer_engine": te, "step_ms": round(step_s * 1e3, 1)}))


if __name__ == "__main__":
    main()
