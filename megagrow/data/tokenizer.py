"""Tokenizers: a sentencepiece BPE model trained here, and Megatron's NullTokenizer.

Both are megatron-core's own text tokenizers (`megatron.core.tokenizers`), so they expose what its
GPTDataset reads: `vocab_size`, `eod` (document separator), `pad` (label id whose loss is masked),
and `unique_identifiers` (part of the dataset index cache key).
"""

from __future__ import annotations

import json
import os

from megatron.core.tokenizers.text.text_tokenizer import MegatronTokenizerText

# Special ids of the models trained here; pad must differ from eos/eod or GPTDataset ignores it.
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3


def _corpus_lines(input_jsonl: str):
    """Non-blank lines of the documents: code lines are short, so they make natural sentences."""
    with open(input_jsonl, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            try:
                text = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{input_jsonl}:{lineno}: not a JSON object with a \"text\" key ({e!r})")
            for text_line in text.splitlines():
                if text_line.strip():
                    yield text_line


def train_sentencepiece(input_jsonl: str, model_prefix: str, vocab_size: int = 4096,
                        max_sentences: int = 200_000, seed: int = 1234) -> str:
    """Train a BPE model on the corpus' "text" fields; writes PREFIX.model/.vocab, returns the .model path.

    Deterministic for a given corpus and seed. Exact round trip of any text: byte fallback encodes
    characters never seen in training, and the identity normalisation keeps tabs, runs of spaces
    and unusual Unicode as they are (the default NFKC rule would rewrite them).
    """
    import sentencepiece as spm

    if not os.path.isfile(input_jsonl):
        raise FileNotFoundError(f"input not found: {input_jsonl}")
    os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)
    tmp_prefix = model_prefix + ".tmp"  # recorded in the model: no pid, so reruns give the same bytes
    bad_input = []  # sentencepiece re-raises the iterator's errors as RuntimeError; keep the original

    def sentences():
        try:
            yield from _corpus_lines(input_jsonl)
        except ValueError as e:
            bad_input.append(e)
            raise

    spm.set_random_generator_seed(seed)  # seeds the sentence sampling below
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences(), model_prefix=tmp_prefix,
            vocab_size=vocab_size, model_type="bpe", byte_fallback=True, character_coverage=1.0,
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,  # indentation runs become single tokens (~1.5x fewer tokens)
            split_digits=True, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID,
            input_sentence_size=max_sentences, shuffle_input_sentence=True,  # bounded time on big corpora
            max_sentence_length=16384, num_threads=2, minloglevel=2)
    except RuntimeError:
        if bad_input:
            raise bad_input[0] from None
        raise
    for ext in (".vocab", ".model"):  # .model last: its presence means the pair is complete
        os.replace(tmp_prefix + ext, model_prefix + ext)
    return model_prefix + ".model"


class TextTokenizer(MegatronTokenizerText):
    """megatron-core's text tokenizer; `pad` is -1 (no pad id) for libraries without one.

    GPTDataset reads `tokenizer.pad` to mask the loss on padding; -1 is its own "no pad" value and
    never equals a real token. (megatron-core's NullTokenizer has no pad id, so `.pad` would raise.)
    """

    @property
    def pad(self) -> int:
        return getattr(self._tokenizer, "pad_id", -1)


def build_tokenizer(tokenizer_type: str, tokenizer_model: str | None = None,
                    vocab_size: int | None = None) -> TextTokenizer:
    """A tokenizer from Megatron-LM's flags (--tokenizer-type, --tokenizer-model, --vocab-size).

    NullTokenizer reads space-separated ids and, as in Megatron-LM, adds an eod id after them:
    its vocab_size is `vocab_size + 1` and its eod is `vocab_size`.
    """
    if tokenizer_type == "SentencePieceTokenizer":
        if not tokenizer_model:
            raise ValueError("SentencePieceTokenizer needs a tokenizer model (--tokenizer-model)")
        if not os.path.isfile(tokenizer_model):
            raise FileNotFoundError(f"tokenizer model not found: {tokenizer_model}")
        # An absolute path, so that the dataset cache key does not depend on the working directory.
        return TextTokenizer(os.path.abspath(tokenizer_model), {"library": "sentencepiece"})
    if tokenizer_type == "NullTokenizer":
        if vocab_size is None or vocab_size < 1:
            raise ValueError("NullTokenizer needs a positive vocab size (--vocab-size)")
        return TextTokenizer(None, {"library": "null"}, vocab_size=int(vocab_size))
    raise ValueError(f"unknown tokenizer type: {tokenizer_type!r} "
                     "(expected SentencePieceTokenizer or NullTokenizer)")
