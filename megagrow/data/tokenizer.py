"""Tokenizers: a sentencepiece BPE model trained here, read as Megatron-LM reads it, and NullTokenizer.

Each exposes what megatron-core's GPTDataset reads: `vocab_size`, `eod` (document separator), `pad` (label id whose loss is masked),
and `unique_identifiers` (part of the dataset index cache key).
"""

from __future__ import annotations

import json
import os
import re


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


class MegatronLMSentencePiece:
    """A sentencepiece model as Megatron-LM's two `--tokenizer-type`s see it (same ids, same vocabulary).

    `GPTSentencePieceTokenizer`: the model's pieces only; eod is the model's eos.
    `SentencePieceTokenizer`: the pieces, then `<CLS> <SEP> <EOD> <MASK>` (and `<PAD>`, `<BOS>`, `<EOS>`
    when the model has no such piece), then `--vocab-extra-ids` `<extra_id_i>` ones, each appended
    after the last id unless the model already has it; eod is `<EOD>`, and special tokens written in
    the text are encoded as their ids. The two are different vocabularies of different sizes.
    """

    def __init__(self, model_file: str, with_special_tokens: bool, vocab_extra_ids: int = 0):
        import sentencepiece as spm

        self.model_file = os.path.abspath(model_file)
        try:
            self._sp = spm.SentencePieceProcessor(model_file=self.model_file)
        except (RuntimeError, OSError):
            raise ValueError(f"--tokenizer-model {model_file}: not a sentencepiece model "
                             f"({sentencepiece_problem(self.model_file)})") from None
        self.vocab = {self._sp.id_to_piece(i): i for i in range(self._sp.get_piece_size())}
        self.special = {}  # token -> id of the ones the text may contain
        self.pad, self.bos, self.eos = self._sp.pad_id(), self._sp.bos_id(), self._sp.eos_id()
        self.eod = self.eos
        if with_special_tokens:
            for token in ("<CLS>", "<SEP>", "<EOD>", "<MASK>"):
                self._add(token)
            self.eod = self.special["<EOD>"]
            self.pad, self.bos, self.eos = (self._add(self._piece(i, default)) for i, default in
                                            ((self.pad, "<PAD>"), (self.bos, "<BOS>"), (self.eos, "<EOS>")))
            for i in range(vocab_extra_ids):
                self._add(f"<extra_id_{i}>")
        self.unique_identifiers = {"class": "SentencePieceTokenizer" if with_special_tokens
                                   else "GPTSentencePieceTokenizer", "model": self.model_file}
        self._inverse = {i: t for t, i in self.special.items()}

    def _piece(self, id_: int, default: str) -> str:
        return self._sp.id_to_piece(id_) if 0 <= id_ < self._sp.get_piece_size() else default

    def _add(self, token: str) -> int:
        self.special[token] = self.vocab.setdefault(token, len(self.vocab))
        return self.special[token]

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def tokenize(self, text: str) -> list[int]:
        if not self.special:
            return self._sp.encode_as_ids(text)
        ids, start = [], 0
        pattern = re.compile("|".join(re.escape(t) for t in sorted(self.special, key=len, reverse=True)))
        for m in pattern.finditer(text):
            ids += self._sp.encode_as_ids(text[start:m.start()]) + [self.special[m.group()]]
            start = m.end()
        return ids + self._sp.encode_as_ids(text[start:])

    def detokenize(self, ids: list[int]) -> str:
        out, run = [], []
        for i in ids:
            if i in self._inverse:
                out += [self._sp.decode_ids(run), self._inverse[i]]
                run = []
            else:
                run.append(i)
        return "".join(out + [self._sp.decode_ids(run)])


def sentencepiece_problem(model_file: str) -> str | None:
    """Why `model_file` does not load as a sentencepiece model, or None (cheap: it only parses the model)."""
    import sentencepiece as spm

    if os.path.getsize(model_file) == 0:
        return "an empty file"
    try:
        spm.SentencePieceProcessor(model_file=model_file)
    except (RuntimeError, OSError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return "sentencepiece: " + re.sub(r"^INTERNAL: | from \S+$", "", reason)
    return None


# Megatron-LM's --tokenizer-type names that megagrow builds (each with Megatron-LM's vocabulary).
TOKENIZER_TYPES = ("GPTSentencePieceTokenizer", "SentencePieceTokenizer", "NullTokenizer")


def build_tokenizer(tokenizer_type: str, tokenizer_model: str | None = None,
                    vocab_size: int | None = None, vocab_extra_ids: int = 0):
    """A tokenizer from Megatron-LM's flags (--tokenizer-type, --tokenizer-model, --vocab-size).

    NullTokenizer reads space-separated ids and, as in Megatron-LM, adds an eod id after them:
    its vocab_size is `vocab_size + 1` and its eod is `vocab_size`.
    """
    if tokenizer_type in ("GPTSentencePieceTokenizer", "SentencePieceTokenizer"):
        if not tokenizer_model:
            raise ValueError(f"{tokenizer_type} needs a tokenizer model (--tokenizer-model)")
        if not os.path.isfile(tokenizer_model):
            raise FileNotFoundError(f"tokenizer model not found: {tokenizer_model}")
        return MegatronLMSentencePiece(tokenizer_model, tokenizer_type == "SentencePieceTokenizer", vocab_extra_ids)
    if tokenizer_type == "NullTokenizer":
        if vocab_size is None or vocab_size < 1:
            raise ValueError("NullTokenizer needs a positive vocab size (--vocab-size)")
        return NullTokenizer(int(vocab_size))
    raise ValueError(f"unknown tokenizer type: {tokenizer_type!r} (expected one of {', '.join(TOKENIZER_TYPES)})")


class NullTokenizer:
    """Megatron-LM's NullTokenizer: the text is space-separated ids; one more id, `vocab_size`, is eod."""

    pad = -1  # no pad id (GPTDataset masks the loss on labels equal to it)

    def __init__(self, vocab_size: int):
        self.eod = vocab_size
        self.vocab_size = vocab_size + 1
        self.unique_identifiers = {"class": "NullTokenizer", "vocab_size": vocab_size}

    def tokenize(self, text: str) -> list[int]:
        return [int(x) for x in text.split()]

    def detokenize(self, ids: list[int]) -> str:
        return " ".join(map(str, ids))
