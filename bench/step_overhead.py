"""Step time of pretrain_gpt.py's loop against a bare megatron-core loop, measured in one run.

Both loops drive the same DDP-wrapped GPTModel, optimizer and dataset in the same torchrun job;
they alternate in rounds so machine noise hits both alike. The bare loop is what a megatron-core
user writes by hand: zero grads, get_forward_backward_func, optimizer.step, scheduler.step.
Ours is megagrow.training.pretrain.train_iteration: the same plus the data sampler, loss reduction,
bookkeeping and metrics (Megatron log line, TensorBoard, JSONL).

    python bench/step_overhead.py [--nproc 2] [--rounds 5] [--steps 10]

Last line: {"overhead_ratio": ours / bare, ...}; target <= 1.03.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def worker(rounds: int, steps: int, argv: list[str]) -> None:
    import torch
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megagrow.runtime.distributed import destroy, print_rank_last
    from megagrow.training.arguments import parse_args
    from megagrow.training.metrics import MetricsLogger
    from megagrow.training.pretrain import _data_iterator, forward_step, setup, train_iteration

    args = parse_args(argv)
    state = setup(args)
    log = MetricsLogger(args)
    ours_iter = _data_iterator(state, state.datasets[0], 0)
    # Same sampler for both loops, so the comparison is of the loop, not of data loading.
    iter_samples = _data_iterator(state, state.datasets[0], 0)

    def bare_step():
        for chunk in state.model:
            chunk.zero_grad_buffer()
        state.optimizer.zero_grad()
        get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter_samples, model=state.model,
                                    num_microbatches=args.num_microbatches, seq_length=args.seq_length,
                                    micro_batch_size=args.micro_batch_size, forward_only=False)
        state.optimizer.step()
        state.scheduler.step(increment=args.global_batch_size)

    def timed(fn) -> float:
        torch.distributed.barrier()
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        torch.distributed.barrier()
        return (time.perf_counter() - t0) / steps

    for _ in range(2):  # warm-up both paths
        bare_step()
        train_iteration(state, ours_iter, log)
    bare, ours = [], []
    for r in range(rounds):
        # alternate which goes first so drift within a round does not favour one side
        if r % 2:
            ours.append(timed(lambda: train_iteration(state, ours_iter, log)))
            bare.append(timed(bare_step))
        else:
            bare.append(timed(bare_step))
            ours.append(timed(lambda: train_iteration(state, ours_iter, log)))
    log.close()
    print_rank_last("RESULT " + json.dumps({"bare_ms": [b * 1e3 for b in bare], "ours_ms": [o * 1e3 for o in ours]}))
    destroy()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--worker", action="store_true")
    p.add_argument("--data-path", default=None, help="indexed dataset prefix; built from the stdlib corpus if absent")
    p.add_argument("--tokenizer-model", default=None)
    opts, rest = p.parse_known_args()
    if opts.worker:
        worker(opts.rounds, opts.steps, rest + ["--data-path", opts.data_path, "--tokenizer-model", opts.tokenizer_model])
        return

    work = tempfile.mkdtemp(prefix="megagrow-bench-")
    if opts.data_path is None:
        # A small local corpus and tokenizer, the same way the quickstart builds them.
        subprocess.run([sys.executable, "tools/prepare_stdlib_corpus.py", "--output", f"{work}/corpus.jsonl",
                        "--max-bytes", "2000000"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        subprocess.run([sys.executable, "tools/train_tokenizer.py", "--input", f"{work}/corpus.jsonl",
                        "--model-prefix", f"{work}/tok", "--vocab-size", "1024"], cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL)
        subprocess.run([sys.executable, "tools/preprocess_data.py", "--input", f"{work}/corpus.jsonl",
                        "--output-prefix", f"{work}/corpus", "--tokenizer-type", "GPTSentencePieceTokenizer",
                        "--tokenizer-model", f"{work}/tok.model", "--append-eod"], cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL)
        opts.data_path, opts.tokenizer_model = f"{work}/corpus_text_document", f"{work}/tok.model"
    model = ["--num-layers", "4", "--hidden-size", "128", "--num-attention-heads", "4", "--seq-length", "128",
             "--micro-batch-size", "4", "--global-batch-size", "16", "--train-iters", "1000", "--lr", "3e-4",
             "--tensor-model-parallel-size", str(opts.nproc), "--data-path", opts.data_path,
             "--tokenizer-type", "GPTSentencePieceTokenizer", "--tokenizer-model", opts.tokenizer_model,
             "--split", "98,1,1", "--log-interval", "10", "--eval-interval", "1000", "--eval-iters", "1",
             "--tensorboard-dir", f"{work}/tb", "--metrics-file", f"{work}/metrics.jsonl",
             "--data-cache-path", f"{work}/cache"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(opts.nproc),
           "--master-port", str(29700 + os.getpid() % 200), __file__, "--worker",
           "--rounds", str(opts.rounds), "--steps", str(opts.steps), *model]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    result = next((line for line in out.stdout.splitlines() if line.startswith("RESULT ")), None)
    if out.returncode != 0 or result is None:
        sys.stderr.write(out.stdout[-3000:] + out.stderr[-3000:])
        sys.exit(f"error: benchmark worker failed (exit {out.returncode})")
    times = json.loads(result[len("RESULT "):])
    bare, ours = statistics.median(times["bare_ms"]), statistics.median(times["ours_ms"])
    print(f"processes: {opts.nproc} (TP={opts.nproc}), {opts.rounds} rounds x {opts.steps} steps each")
    print(f"bare megatron-core loop: median {bare:.1f} ms/step  {['%.1f' % t for t in times['bare_ms']]}")
    print(f"pretrain_gpt.py loop:    median {ours:.1f} ms/step  {['%.1f' % t for t in times['ours_ms']]}")
    print(json.dumps({"overhead_ratio": round(ours / bare, 4), "ours_ms_per_step": round(ours, 2),
                      "bare_ms_per_step": round(bare, 2), "nproc": opts.nproc}))


if __name__ == "__main__":
    main()
