"""--profile (Megatron-LM's): iterations --profile-step-start..--profile-step-end on --profile-ranks, traced
(all ranks when it is empty) by torch.profiler into --tensorboard-dir with --use-pytorch-profiler, else marked as CUDA's profiler range
(with NVTX ranges) for an `nsys profile --capture-range=cudaProfilerApi` run."""

from __future__ import annotations

import torch


class Profiler:
    def __init__(self, args):
        self.args = args
        self.on = args.profile and (not args.profile_ranks or torch.distributed.get_rank() in args.profile_ranks)
        self.trace = self.nvtx = None
        if self.on and args.use_pytorch_profiler:
            start, end = args.profile_step_start, args.profile_step_end
            self.trace = torch.profiler.profile(
                schedule=torch.profiler.schedule(wait=max(start - 1, 0), warmup=1 if start > 0 else 0,
                                                 active=end - start, repeat=1),
                on_trace_ready=torch.profiler.tensorboard_trace_handler(args.tensorboard_dir),
                record_shapes=True, with_stack=True)
            self.trace.start()

    def before_iteration(self, iteration: int) -> None:
        if not self.on:
            return
        if self.trace is not None:
            self.trace.step()
        elif iteration == self.args.profile_step_start:
            torch.cuda.check_error(torch.cuda.cudart().cudaProfilerStart())
            self.nvtx = torch.autograd.profiler.emit_nvtx(record_shapes=True)
            self.nvtx.__enter__()

    def after_iteration(self, iteration: int) -> None:
        if self.on and iteration == self.args.profile_step_end:
            self.close()

    def close(self) -> None:
        if self.trace is not None:
            self.trace.stop()
            self.trace = None
        if self.nvtx is not None:
            torch.cuda.check_error(torch.cuda.cudart().cudaProfilerStop())
            self.nvtx.__exit__(None, None, None)
            self.nvtx = None
        self.on = False
