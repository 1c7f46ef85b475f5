"""Tokenizers: sentencepiece trained here, and Megatron's NullTokenizer for synthetic ids.

The objects expose what megatron-core's GPTDataset and our tools read: `vocab_size`, `eod`, `pad`,
`tokenize`, `detokenize` and `unique_identifiers` (part of the dataset cache key).
"""

from __future__ import annotations

import json
import os


def _texts(input_jsonl: str, max_sentences: int, lines_per_sentence: int = 8):
    """Blocks of a few lines of the corpus' documents, newlines kept: code is made of them."""
    n = 0
    with open(input_jsonl) as f:
        for line in f:
            lines = json.loads(line)["text"].splitlines(keepends=True)
            for i in range(0, len(lines), lines_per_sentence):
                block = "".join(lines[i:i + lines_per_sentence])
                if block.strip():
                    yield block
                    n += 1
                    if n >= max_sentences:
                        return


def train_sentencepiece(input_jsonl: str, model_prefix: str, vocab_size: int = 4096,
                        max_sentences: int = 100_000) -> str:
    """Train a BPE model (byte fallback, so any text encodes) and return the .model path."""
    import sentencepiece as spm
    os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=_texts(input_jsonl, max_sentences), model_prefix=model_prefix + ".tmp",
        vocab_size=vocab_size, model_type="bpe", byte_fallback=True, character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3, split_digits=True, num_threads=2,
        max_sentence_length=16384, minloglevel=2,
        # Code: keep newlines and indentation exactly (the default NFKC rule folds them to spaces).
        normalization_rule_name="identity", remove_extra_whitespaces=False, allow_whitespace_only_pieces=True)
    for ext in (".model", ".vocab"):
        os.replace(model_prefix + ".tmp" + ext, model_prefix + ext)
    return model_prefix + ".model"


class SentencePieceTokenizer:
    def __init__(self, model_path: str):
        import sentencepiece as spm
        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"tokenizer model not found: {model_path}")
        self._sp = spm.SentencePieceProcessor(model_file=model_path)
        self.vocab_size = self._sp.get_piece_size()
        self.eod = self._sp.eos_id()
        self.pad = self._sp.pad_id()
        self.unique_identifiers = {"class": type(self).__name__, "tokenizer_path": [os.path.abspath(model_path)]}

    def tokenize(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def detokenize(self, ids) -> str:
        return self._sp.decode(list(ids))


class NullTokenizer:
    """Whitespace-separated integer ids (Megatron-LM's NullTokenizer); eod is the last id."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.eod = vocab_size - 1
        self.pad = -1
        self.unique_identifiers = {"class": type(self).__name__, "vocab_size": vocab_size}

    def tokenize(self, text: str) -> list[int]:
        return [int(t) for t in text.split()]

    def detokenize(self, ids) -> str:
        return " ".join(str(i) for i in ids)


def build_tokenizer(tokenizer_type: str, tokenizer_model: str | None = None, vocab_size: int | None = None):
    if tokenizer_type == "SentencePieceTokenizer":
        return SentencePieceTokenizer(tokenizer_model)
    if tokenizer_type == "NullTokenizer":
        return NullTokenizer(vocab_size)
    raise ValueError(f"unknown --tokenizer-type {tokenizer_type}")
