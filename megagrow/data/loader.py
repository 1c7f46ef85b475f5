"""Datasets for a run and the order in which ranks read them (Megatron-LM's pretraining sampler)."""

from __future__ import annotations

import torch


def num_samples(args) -> list[int]:
    """Samples the train/valid/test splits must provide for this run (as Megatron-LM asks)."""
    evals = args.train_iters // args.eval_interval + 1
    return [args.train_iters * args.global_batch_size,
            evals * args.eval_iters * args.global_batch_size,
            args.eval_iters * args.global_batch_size]


def build_datasets(args, tokenizer):
    from megagrow.data.datasets import build_gpt_datasets
    return build_gpt_datasets(args.data_path, args.split, args.seq_length, args.seed, tokenizer,
                              num_samples(args), data_cache_path=args.data_cache_path,
                              dp_size=args.data_parallel_size)


def microbatches(dataset, first_sample: int, micro_batch_size: int, dp_rank: int, dp_size: int, device):
    """Endless microbatches for one data-parallel rank, starting at global sample `first_sample`.

    Each step of mbs x DP consecutive samples is split among DP ranks, so a global batch holds the
    same samples whatever the DP size; resuming from `consumed_samples` continues the exact order.
    """
    start = first_sample
    while True:
        lo = start + dp_rank * micro_batch_size
        samples = [dataset[i % len(dataset)] for i in range(lo, lo + micro_batch_size)]
        yield {key: torch.stack([torch.as_tensor(s[key]) for s in samples]).to(device, non_blocking=True)
               for key in ("tokens", "labels", "loss_mask", "position_ids", "attention_mask") if key in samples[0]}
        start += micro_batch_size * dp_size
