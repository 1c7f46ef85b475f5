"""Process groups and seeds: torch.distributed (NCCL with CUDA, gloo without) and parallel_state."""

from __future__ import annotations

import os
import random
from datetime import timedelta

import numpy as np
import torch
from megatron.core import parallel_state, tensor_parallel

from megagrow.runtime import cpu_compat


def initialize_distributed(tensor_parallel_size: int, pipeline_parallel_size: int,
                           backend: str | None = None, timeout_minutes: int = 10,
                           virtual_pipeline_size: int | None = None) -> None:
    """Join the job launched by torchrun/srun (or a lone process) and build Megatron's groups."""
    if not torch.cuda.is_available():
        cpu_compat.apply()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(
            backend=backend or ("nccl" if torch.cuda.is_available() else "gloo"),
            rank=rank, world_size=world_size, timeout=timedelta(minutes=timeout_minutes))
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tensor_parallel_size,
            pipeline_model_parallel_size=pipeline_parallel_size,
            virtual_pipeline_model_parallel_size=virtual_pipeline_size)


def set_seeds(seed: int) -> None:
    """Megatron-LM's seeding: a per-pipeline-stage base seed and the model-parallel RNG tracker."""
    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def is_last_rank() -> bool:
    return torch.distributed.get_rank() == torch.distributed.get_world_size() - 1


def print_rank_0(*values) -> None:
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print(*values, flush=True)


def print_rank_last(*values) -> None:
    if not torch.distributed.is_initialized() or is_last_rank():
        print(*values, flush=True)


def collective_tensor(values: list[float], dtype=torch.float32) -> torch.Tensor:
    """A small tensor for a collective: on the GPU with CUDA (NCCL reduces only GPU tensors), else the CPU."""
    return torch.tensor(values, dtype=dtype, device="cuda" if torch.cuda.is_available() else "cpu")
