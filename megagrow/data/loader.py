"""Datasets for a run and the order in which ranks read them (Megatron-LM's pretraining sampler)."""

from __future__ import annotations

import atexit
import functools
import multiprocessing
import signal

import torch


def num_samples(args) -> list[int]:
    """Samples the train/valid/test splits must provide for this run (as Megatron-LM asks)."""
    evals = args.train_iters // args.eval_interval + 1
    return [args.train_samples or args.train_iters * args.global_batch_size,
            evals * args.eval_iters * args.global_batch_size,
            args.eval_iters * args.global_batch_size]


def build_datasets(args, tokenizer):
    """The run's (train, valid, test) from its data flags (a checkpoint's args may predate the newer ones)."""
    from megagrow.data.datasets import build_gpt_datasets
    per_split = [getattr(args, f"{split}_data_path", None) for split in ("train", "valid", "test")]
    return build_gpt_datasets(args.data_path, args.split, args.seq_length, args.seed, tokenizer,
                              num_samples(args), data_cache_path=args.data_cache_path,
                              dp_size=args.data_parallel_size, per_split=None if args.data_path else per_split,
                              mock=getattr(args, "mock_data", False) and not args.data_path,
                              mmap_bin_files=getattr(args, "mmap_bin_files", True),
                              create_attention_mask=getattr(args, "create_attention_mask_in_dataloader", True))


class _RankSamples(torch.utils.data.Sampler):
    """The sample indices of one data-parallel rank's microbatches, endlessly (Megatron-LM's pretraining sampler):
    each step of mbs x DP consecutive samples is split among DP ranks, so a global batch holds the same samples
    whatever the DP size; starting at `consumed_samples` continues the exact order."""

    def __init__(self, size: int, first_sample: int, micro_batch_size: int, dp_rank: int, dp_size: int):
        self.size, self.first, self.mbs, self.rank, self.dp = size, first_sample, micro_batch_size, dp_rank, dp_size

    def __iter__(self):
        start = self.first
        while True:
            lo = start + self.rank * self.mbs
            yield [i % self.size for i in range(lo, lo + self.mbs)]
            start += self.mbs * self.dp


def _stack(samples: list[dict]) -> dict:
    return {key: torch.stack([torch.as_tensor(s[key]) for s in samples])
            for key in ("tokens", "labels", "loss_mask", "position_ids", "attention_mask") if key in samples[0]}


def _leave_signals_to_the_trainer(worker_id: int) -> None:
    """SLURM signals every process of a step: a worker must not die of the SIGTERM the trainer saves on."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


@functools.cache
def _kill_workers_at_exit() -> None:
    """At exit multiprocessing ends daemonic children with SIGTERM and waits for them: ours ignore it, so a
    loader still open then (an exception's frames hold it) would wait forever. Registered after
    multiprocessing's handler, this runs first."""
    atexit.register(lambda: [p.kill() for p in multiprocessing.active_children() if p.daemon])


def microbatches(dataset, first_sample: int, micro_batch_size: int, dp_rank: int, dp_size: int, device,
                 num_workers: int = 0):
    """Endless microbatches for one data-parallel rank, starting at global sample `first_sample` (see
    _RankSamples), read by a DataLoader with `num_workers` processes (Megatron-LM's --num-workers; 0: here).
    The loader seeds its workers from its own generator: drawn from torch's global one, the seed would shift the
    dropout stream a resumed run restores (each evaluation starts a loader)."""
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=_RankSamples(len(dataset), first_sample, micro_batch_size, dp_rank, dp_size),
        num_workers=num_workers, collate_fn=_stack, pin_memory=str(device).startswith("cuda"),
        worker_init_fn=_leave_signals_to_the_trainer, generator=torch.Generator().manual_seed(dp_rank))
    if num_workers:
        _kill_workers_at_exit()
    for batch in loader:
        yield {key: value.to(device, non_blocking=True) for key, value in batch.items()}
