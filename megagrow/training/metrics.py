"""Megatron-style log lines, TensorBoard scalars and a JSONL metrics file, written by the last rank."""

from __future__ import annotations

import json
import math
import os
import time

from megagrow.model.shape import num_floating_point_operations
from megagrow.runtime.distributed import is_last_rank


class MetricsLogger:
    def __init__(self, args):
        self.args = args
        self.enabled = is_last_rank()
        self.writer = None
        self.metrics_file = None
        if self.enabled and args.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(log_dir=args.tensorboard_dir, max_queue=100)
        if self.enabled and args.metrics_file:
            os.makedirs(os.path.dirname(os.path.abspath(args.metrics_file)), exist_ok=True)
            self.metrics_file = open(args.metrics_file, "a")

    def _record(self, kind: str, iteration: int, values: dict) -> None:
        if self.metrics_file:
            flops = getattr(self.args, "num_floating_point_operations_so_far", 0)
            self.metrics_file.write(json.dumps({"kind": kind, "iteration": iteration, **values, "flops": flops}) + "\n")
            self.metrics_file.flush()

    def optimizer(self, iteration: int, values: dict) -> None:
        """The optimizer hyper-parameters the iteration after `iteration` (a --load) trains with."""
        self._record("optimizer", iteration, values)

    def training(self, iteration: int, consumed: int, loss: float, lr: float, grad_norm: float | None,
                 step_seconds: float, skipped: int, log_line: bool) -> None:
        if not self.enabled:
            return
        a = self.args
        tokens_per_s = a.global_batch_size * a.seq_length / step_seconds
        tflops = num_floating_point_operations(a, a.global_batch_size) / step_seconds / a.world_size / 1e12
        self._record("train", iteration, {"lm loss": loss, "lr": lr, "grad_norm": grad_norm,
                                          "consumed_samples": consumed, "step_ms": step_seconds * 1e3,
                                          "tokens_per_s": tokens_per_s})
        if self.writer:
            for tag, value in (("lm loss", loss), ("learning-rate", lr), ("grad-norm", grad_norm),
                               ("batch-size", a.global_batch_size), ("iteration-time", step_seconds),
                               ("tokens-per-sec", tokens_per_s), ("throughput", tflops)):
                if value is not None:
                    self.writer.add_scalar(tag, value, iteration)
            self.writer.add_scalar("lm loss vs samples", loss, consumed)
        if log_line:
            grad = f" grad norm: {grad_norm:.3f} |" if grad_norm is not None else ""
            print(f" [{time.strftime('%Y-%m-%d %H:%M:%S')}] iteration {iteration:8d}/{a.train_iters:8d} |"
                  f" consumed samples: {consumed:12d} | elapsed time per iteration (ms): {step_seconds * 1e3:.1f} |"
                  f" throughput per GPU (TFLOP/s/GPU): {tflops:.2f} | tokens/s: {tokens_per_s:.0f} |"
                  f" learning rate: {lr:.6E} | global batch size: {a.global_batch_size:5d} |"
                  f" lm loss: {loss:.6E} |{grad} number of skipped iterations: {skipped:3d} |", flush=True)

    def validation(self, iteration: int, loss: float, where: str) -> None:
        if not self.enabled:
            return
        ppl = math.exp(min(20.0, loss))
        self._record("valid", iteration, {"lm loss": loss, "ppl": ppl})
        if self.writer:
            self.writer.add_scalar("lm loss validation", loss, iteration)
            self.writer.add_scalar("lm loss validation ppl", ppl, iteration)
            self.writer.flush()
        line = f" validation loss {where} | lm loss value: {loss:.6E} | lm loss PPL: {ppl:.6E} | "
        print("-" * len(line) + "\n" + line + "\n" + "-" * len(line), flush=True)

    def close(self) -> None:
        if self.writer:
            self.writer.close()
        if self.metrics_file:
            self.metrics_file.close()
