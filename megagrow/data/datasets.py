"""Train/valid/test GPT datasets from Megatron indexed data, built by megatron-core's builder.

Every rank builds the datasets (`is_built_on_rank` is always true). When torch.distributed is
initialised, megatron-core's builder itself serialises the work: global rank 0 builds and writes the
index caches (document/sample/shuffle indices as .npy), all ranks meet at a barrier on the default
process group, then the other ranks build, which only loads rank 0's cache. So:
  - `build_gpt_datasets` must be called by every rank of the default group (a rank that skips it
    leaves the others waiting at the barrier), and the same arguments on all ranks;
  - the cache directory must be visible to every rank (shared filesystem across nodes);
  - with gloo this costs only a few barriers. Without torch.distributed, it simply builds in process.
Problems that would otherwise surface on rank 0 alone (and leave the other ranks hanging at that
barrier) are checked here first, identically on every rank.
"""

from __future__ import annotations

import contextlib
import os

import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
from megatron.core.datasets.utils import get_blend_from_list

from megagrow.data.indexed import DataError, check_split, sequence_lengths


def _check_data(prefixes: list[str], split: str | None) -> None:
    """Fail clearly on a missing prefix, a corrupt .idx/.bin pair, or a split that would get no tokens
    (megagrow.data.indexed: the same checks the trainer's arguments make)."""
    for prefix in prefixes:
        if not (os.path.isfile(prefix + ".bin") and os.path.isfile(prefix + ".idx")):
            raise FileNotFoundError(f"data path not found: {prefix} (expected {prefix}.bin and {prefix}.idx)")
    for prefix in prefixes:
        if split is not None:
            check_split(prefix, split)
        elif not sequence_lengths(prefix).sum():  # a per-split blend is that split whole
            raise DataError(f"{prefix} holds no tokens")


def build_gpt_datasets(data_path: list[str] | None, split: str | None, seq_length: int, seed: int, tokenizer,
                       train_val_test_num_samples: list[int], data_cache_path: str | None = None,
                       dp_size: int = 1, *, per_split: list[list[str] | None] | None = None, mock: bool = False,
                       mmap_bin_files: bool = True, create_attention_mask: bool = True):
    """(train, valid, test) datasets whose samples hold tokens, labels, loss_mask, position_ids and
    attention_mask (unless `create_attention_mask` is false), each of `seq_length`.

    One source, as Megatron-LM's flags give it: `data_path` (--data-path: `[prefix]`, or `[weight1, prefix1,
    weight2, prefix2, ...]` for a blend) divided by `split` (e.g. "949,50,1": documents of each prefix, in
    order); or `per_split` (--train-data-path, --valid-data-path, --test-data-path: a blend each, or None); or
    `mock` (megatron-core's MockGPTDataset, `split` defaulting to an even one). A split with weight 0 or no
    blend is None. Index caches go to `data_cache_path` (default: megatron-core's, beside the data).
    """
    blend = get_blend_from_list(data_path) if data_path and not mock else None
    blend_per_split = [get_blend_from_list(paths) for paths in per_split] if per_split and not mock else None
    blends = [b for b in [blend, *(blend_per_split or [])] if b is not None]
    _check_data([prefix for prefixes, _ in blends for prefix in prefixes], split if blend else None)
    config = GPTDatasetConfig(
        random_seed=seed, sequence_length=seq_length, blend=blend, blend_per_split=blend_per_split,
        split=None if blend_per_split else split, tokenizer=tokenizer, reset_position_ids=False,
        reset_attention_mask=False, eod_mask_loss=False, create_attention_mask=create_attention_mask,
        mmap_bin_files=mmap_bin_files, path_to_cache=data_cache_path, data_parallel_size=dp_size)
    builder = BlendedMegatronDatasetBuilder(MockGPTDataset if mock else GPTDataset, train_val_test_num_samples,
                                            lambda: True, config)
    if any(len(prefixes) > 1 for prefixes, _ in blends) and not torch.distributed.is_initialized():
        with _single_process_group():
            return builder.build()
    return builder.build()


@contextlib.contextmanager
def _single_process_group():
    """A one-rank gloo group for the duration of a build, on an in-memory store (no network).

    megatron-core's BlendedDataset calls torch.distributed.get_rank() unconditionally when it writes
    its index cache, which raises outside torch.distributed; with one rank it behaves as rank 0.
    """
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()
