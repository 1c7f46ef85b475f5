"""Megatron-style log lines, TensorBoard scalars and a JSONL metrics file, written by the last rank."""

from __future__ import annotations

import json
import math
import os
import time

import torch

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
        self.wandb = _wandb_run(args) if self.enabled and args.wandb_project else None
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
                 step_seconds: float, skipped: int, log_line: bool, global_batch: int,
                 num_zeros: int | None = None, params_norm: float | None = None) -> None:
        if not self.enabled:
            return
        a = self.args
        tokens_per_s = global_batch * a.seq_length / step_seconds
        tflops = num_floating_point_operations(a, global_batch) / step_seconds / a.world_size / 1e12
        self._record("train", iteration, {"lm loss": loss, "lr": lr, "grad_norm": grad_norm,
                                          "consumed_samples": consumed, "global_batch_size": global_batch,
                                          "step_ms": step_seconds * 1e3, "tokens_per_s": tokens_per_s,
                                          "tflops_per_gpu": tflops, "num_zeros": num_zeros,
                                          "params_norm": params_norm})
        scalars = {"lm loss": loss, "learning-rate": lr, "grad-norm": grad_norm, "batch-size": global_batch,
                   "iteration-time": step_seconds, "tokens-per-sec": tokens_per_s, "throughput": tflops,
                   "num-zeros": num_zeros, "params-norm": params_norm}
        scalars = {tag: value for tag, value in scalars.items() if value is not None}
        if self.writer:
            for tag, value in scalars.items():
                self.writer.add_scalar(tag, value, iteration)
            self.writer.add_scalar("lm loss vs samples", loss, consumed)
        if self.wandb:
            self.wandb.log(scalars, step=iteration)
        if log_line:
            fields = [f"iteration {iteration:8d}/{a.train_iters:8d}", f"consumed samples: {consumed:12d}",
                      f"elapsed time per iteration (ms): {step_seconds * 1e3:.1f}"]
            if a.log_throughput:
                fields.append(f"throughput per GPU (TFLOP/s/GPU): {tflops:.1f}")
            fields += [f"tokens/s: {tokens_per_s:.0f}", f"learning rate: {lr:.6E}",
                       f"global batch size: {global_batch:5d}", f"lm loss: {loss:.6E}"]
            for name, value, form in (("grad norm", grad_norm, ".3f"), ("num zeros", num_zeros, ".0f"),
                                      ("params norm", params_norm, ".3f")):
                if value is not None:
                    fields.append(f"{name}: {value:{form}}")
            fields.append(f"number of skipped iterations: {skipped:3d}")
            print(f" [{time.strftime('%Y-%m-%d %H:%M:%S')}] " + " | ".join(fields) + " |", flush=True)

    def validation(self, iteration: int, loss: float, where: str) -> None:
        if not self.enabled:
            return
        ppl = math.exp(min(20.0, loss))
        self._record("valid", iteration, {"lm loss": loss, "ppl": ppl})
        if self.wandb:
            self.wandb.log({"lm loss validation": loss, "lm loss validation ppl": ppl}, step=iteration)
        if self.writer:
            self.writer.add_scalar("lm loss validation", loss, iteration)
            self.writer.add_scalar("lm loss validation ppl", ppl, iteration)
            self.writer.flush()
        line = f" validation loss {where} | lm loss value: {loss:.6E} | lm loss PPL: {ppl:.6E} | "
        print("-" * len(line) + "\n" + line + "\n" + "-" * len(line), flush=True)

    def close(self) -> None:
        if self.wandb:
            self.wandb.finish()
        if self.writer:
            self.writer.close()
        if self.metrics_file:
            self.metrics_file.close()


def _wandb_run(args):
    """Weights & Biases as Megatron-LM starts it (the last rank; --wandb-save-dir, else SAVE/wandb; the
    flags as its config). WANDB_MODE=offline keeps it on this machine."""
    import wandb
    save_dir = args.wandb_save_dir or os.path.join(args.save, "wandb")
    os.makedirs(save_dir, exist_ok=True)
    config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, list, type(None)))}
    return wandb.init(dir=save_dir, name=args.wandb_exp_name, project=args.wandb_project, config=config,
                      **({"entity": args.wandb_entity} if args.wandb_entity else {}))


def params_l2_norm(model_chunks: list) -> float:
    """The L2 norm of the whole model's parameters (Megatron-LM's --log-params-norm): each tensor counted
    once across tensor-parallel ranks and tied copies, summed over the model-parallel group."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
    params = [p for chunk in model_chunks for p in chunk.parameters()
              if param_is_not_tensor_parallel_duplicate(p) and not getattr(p, "shared", False)]
    total = torch.zeros(1, dtype=torch.float64, device=params[0].device if params else "cpu")
    for p in params:
        total += p.detach().double().pow(2).sum()
    torch.distributed.all_reduce(total, group=parallel_state.get_model_parallel_group())
    return total.sqrt().item()
