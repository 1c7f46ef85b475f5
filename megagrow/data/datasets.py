"""Train/valid/test GPT datasets from Megatron indexed data, through megatron-core's builder."""

from __future__ import annotations

import os

from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron.core.datasets.utils import get_blend_from_list


def _check_prefixes(data_path: list[str], split: str) -> None:
    prefixes = data_path if len(data_path) == 1 else data_path[1::2]
    weights = [float(w) for w in split.replace("/", ",").split(",")]
    for prefix in prefixes:
        if not (os.path.isfile(prefix + ".bin") and os.path.isfile(prefix + ".idx")):
            raise FileNotFoundError(f"data path not found: {prefix} (expected {prefix}.bin and {prefix}.idx)")
        # megatron-core loops forever on a split that gets no document but is asked for samples.
        docs = len(IndexedDataset(prefix, mmap=True).document_indices) - 1
        for name, w in zip(("train", "valid", "test"), weights):
            if w > 0 and int(round(docs * w / sum(weights))) < 1:
                raise ValueError(f"--split {split}: the {name} split of {prefix} ({docs} documents) is empty")


def build_gpt_datasets(data_path: list[str], split: str, seq_length: int, seed: int, tokenizer,
                       train_val_test_num_samples: list[int], data_cache_path: str | None = None,
                       dp_size: int = 1):
    """(train, valid, test) GPTDatasets; every rank builds them (each reads the shared cache if built)."""
    _check_prefixes(data_path, split)
    config = GPTDatasetConfig(
        random_seed=seed, sequence_length=seq_length, blend=get_blend_from_list(data_path), split=split,
        tokenizer=tokenizer, reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
        create_attention_mask=True, path_to_cache=data_cache_path, data_parallel_size=dp_size)
    return BlendedMegatronDatasetBuilder(GPTDataset, train_val_test_num_samples, lambda: True, config).build()
