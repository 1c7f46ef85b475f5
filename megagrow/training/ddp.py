"""megatron-core's DistributedDataParallel as Megatron-LM configures it, and the parameter-gather hooks
of --overlap-param-gather."""

from __future__ import annotations

import contextlib

from megatron.core.distributed import DistributedDataParallelConfig


def ddp_config_from_args(args) -> DistributedDataParallelConfig:
    """Megatron-LM's DDP settings: fp32 reduction for half precision unless --grad-reduce-in-bf16; buckets
    only when they overlap the backward pass, of --ddp-bucket-size or max(40M, 1M x DP) elements."""
    bucket = None
    if args.overlap_grad_reduce:
        bucket = args.ddp_bucket_size or max(40_000_000, 1_000_000 * args.data_parallel_size)
    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=(args.bf16 or args.fp16) and not args.grad_reduce_in_bf16,
        use_distributed_optimizer=args.use_distributed_optimizer, overlap_grad_reduce=args.overlap_grad_reduce,
        overlap_param_gather=args.overlap_param_gather, align_param_gather=args.align_param_gather, bucket_size=bucket,
        average_in_collective=args.ddp_average_in_collective)


class ParamGatherHooks:
    """--overlap-param-gather: the distributed optimizer's updated parameters are gathered bucket by bucket
    in the next forward pass, by DDP's forward pre-hooks. As in Megatron-LM, the hooks stay off until an
    iteration has updated (a bad load fails in its own step, not inside a gather), and the parameters are
    gathered in full before an evaluation or a save, which must see the updated values."""

    def __init__(self, model_chunks: list, overlap_param_gather: bool):
        self.chunks = model_chunks if overlap_param_gather else []
        for chunk in self.chunks:
            chunk.disable_forward_pre_hook(param_sync=False)
        self.enabled = False

    def after_update(self) -> None:
        if self.chunks and not self.enabled:
            for chunk in self.chunks:
                chunk.enable_forward_pre_hook()
            self.enabled = True

    @contextlib.contextmanager
    def gathered(self):
        """Hooks off and parameters gathered for the body; back on after."""
        active = self.enabled
        for chunk in self.chunks if active else []:
            chunk.disable_forward_pre_hook(param_sync=True)
        try:
            yield
        finally:
            for chunk in self.chunks if active else []:
                chunk.enable_forward_pre_hook()
