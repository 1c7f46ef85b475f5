"""What the staged-training benchmarks share: their budget flags and the trainer settings of their plans."""

from __future__ import annotations

import argparse
import os

from megagrow.data.prepare import prepare_data
from megagrow.data.tokenizer import build_tokenizer


def budget_parser(doc: str, output: str, tokens: float) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default=output)
    p.add_argument("--tokens", type=float, default=tokens, help="budget: tokens of a scratch run of the target")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--vocab-size", type=int, default=2048, help="of the sentencepiece tokenizer trained here")
    p.add_argument("--quick", action="store_true", help="a tenth of the budget (a smoke run, not a measurement)")
    return p


def prepare(a) -> tuple[float, dict, int]:
    """(the budget in tokens, the data's plan entries, the tokenizer's vocabulary) for parsed flags `a`."""
    data = prepare_data(os.path.join(a.output, "data"), vocab_size=a.vocab_size)
    vocab = build_tokenizer("GPTSentencePieceTokenizer", data["tokenizer_model"], None).vocab_size
    return (a.tokens / 10 if a.quick else a.tokens), {**data, "split": "98,1,1"}, vocab


def training(lr: float, warmup: int, eval_interval: int, save_interval: int) -> dict:
    """A plan's `training:` for the benchmarks' models (batch 16 of 128 tokens, cosine to lr/10)."""
    return {"global_batch_size": 16, "micro_batch_size": 8, "seq_length": 128, "lr": lr, "min_lr": lr / 10,
            "lr_decay_style": "cosine", "lr_warmup_iters": warmup, "weight_decay": 0.1, "clip_grad": 1.0,
            "log_interval": 10, "eval_interval": eval_interval, "eval_iters": 4, "save_interval": save_interval,
            "seed": 1234}
