"""Tokenizers with Megatron-LM's `--tokenizer-type` meanings: sentencepiece models (one trained here, read as
Megatron-LM reads it), a local Hugging Face tokenizer directory, GPT-2's vocab.json + merges.txt, a tiktoken
vocabulary, and NullTokenizer.

Each exposes what megatron-core's GPTDataset and the trainer read: `vocab_size`, `eod` (document separator),
`pad` (label id whose loss is masked), `unique_identifiers` (part of the dataset index cache key), and
`tokenize`/`detokenize`. The Hugging Face, GPT-2 and tiktoken ones need packages megagrow does not depend on
(the `hf` extra): they are imported only when such a tokenizer is built.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re

from megagrow.errors import MegagrowError


class TokenizerError(MegagrowError):
    """A tokenizer that cannot be built from its flags; one line naming the flag (and its path)."""


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
    """A sentencepiece model as Megatron-LM's `--tokenizer-type`s see it (same ids, same vocabulary).

    `GPTSentencePieceTokenizer` and `Llama2Tokenizer`: the model's pieces only; eod is the model's eos, pad its
    pad (Megatron-LM 0.16 builds both as megatron-core's SentencePieceTokenizer: no BOS is added; only its
    `--legacy-tokenizer` Llama2Tokenizer prepended one).
    `SentencePieceTokenizer`: the pieces, then `<CLS> <SEP> <EOD> <MASK>` (and `<PAD>`, `<BOS>`, `<EOS>`
    when the model has no such piece), then `--vocab-extra-ids` `<extra_id_i>` ones, each appended
    after the last id unless the model already has it; eod is `<EOD>`, and special tokens written in
    the text are encoded as their ids. The two are different vocabularies of different sizes.
    """

    def __init__(self, model_file: str, with_special_tokens: bool, vocab_extra_ids: int = 0, name: str | None = None):
        import sentencepiece as spm

        self.model_file = os.path.abspath(model_file)
        try:
            self._sp = spm.SentencePieceProcessor(model_file=self.model_file)
        except (RuntimeError, OSError):
            raise TokenizerError(f"--tokenizer-model {model_file}: not a sentencepiece model "
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
        name = name or ("SentencePieceTokenizer" if with_special_tokens else "GPTSentencePieceTokenizer")
        self.unique_identifiers = {"class": name, "model": self.model_file}
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


# Megatron-LM's --tokenizer-type names that megagrow builds (each with Megatron-LM's vocabulary), and the
# flags (Namespace dests) that name each one's files.
TOKENIZER_FILES = {
    "GPTSentencePieceTokenizer": ("tokenizer_model",),
    "SentencePieceTokenizer": ("tokenizer_model",),
    "Llama2Tokenizer": ("tokenizer_model",),
    "HuggingFaceTokenizer": ("tokenizer_model",),  # a directory
    "GPT2BPETokenizer": ("vocab_file", "merge_file"),
    "TikTokenizer": ("tokenizer_model",),
    "NullTokenizer": (),
}
TOKENIZER_TYPES = tuple(TOKENIZER_FILES)
FILE_FLAGS = {"tokenizer_model": ("--tokenizer-model", "tokenizer model"), "vocab_file": ("--vocab-file", "vocab file"),
              "merge_file": ("--merge-file", "merge file")}
# The package each type needs beyond megagrow's own dependencies (`pip install megagrow[hf]`).
PACKAGES = {"HuggingFaceTokenizer": "transformers", "GPT2BPETokenizer": "tokenizers", "TikTokenizer": "tiktoken"}
# Every flag a tokenizer is built from (Namespace dests) with Megatron-LM's default: a checkpoint's args or a
# plan may leave some out.
TOKENIZER_FLAGS = {"tokenizer_type": None, "tokenizer_model": None, "vocab_size": None, "vocab_extra_ids": 0,
                   "vocab_file": None, "merge_file": None, "tiktoken_pattern": None,
                   "tiktoken_num_special_tokens": 1000, "tiktoken_special_tokens": None}


def add_tokenizer_args(g) -> None:
    """The tokenizer flags with Megatron-LM's names and defaults, as its trainer and preprocess_data.py take them."""
    g.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES, default=None,
                   help="as Megatron-LM: GPTSentencePieceTokenizer and Llama2Tokenizer are the model's own vocabulary, "
                        "SentencePieceTokenizer appends <CLS> <SEP> <EOD> <MASK> to it (default: "
                        "GPTSentencePieceTokenizer with --tokenizer-model, else NullTokenizer)")
    g.add_argument("--tokenizer-model", default=None,
                   help="a sentencepiece .model; HuggingFaceTokenizer: a local tokenizer directory (never a hub name); "
                        "TikTokenizer: its vocabulary .json")
    g.add_argument("--vocab-file", default=None, help="GPT2BPETokenizer: GPT-2's vocab.json")
    g.add_argument("--merge-file", default=None, help="GPT2BPETokenizer: GPT-2's merges.txt")
    g.add_argument("--vocab-size", type=int, default=None,
                   help="NullTokenizer: ids below it; TikTokenizer: the vocabulary with its special tokens "
                        "(default 131072)")
    g.add_argument("--vocab-extra-ids", type=int, default=0, help="<extra_id_i> tokens (SentencePieceTokenizer)")
    g.add_argument("--tiktoken-pattern", choices=["v1", "v2"], default=None,
                   help="TikTokenizer's pre-split regex (default v2)")
    g.add_argument("--tiktoken-num-special-tokens", type=int, default=1000,
                   help="TikTokenizer: ids below it are special tokens; the file's tokens follow")
    g.add_argument("--tiktoken-special-tokens", nargs="+", default=None,
                   help="TikTokenizer's named special tokens (including <unk> <s> </s> <mask> <pad> <cls> <sep>)")


def default_tokenizer_type(tokenizer_type: str | None, tokenizer_model: str | None,
                           vocab_file: str | None = None, merge_file: str | None = None) -> str:
    """megagrow's default where Megatron-LM has none (it refuses a missing --tokenizer-type): GPT-2's BPE for
    --vocab-file and --merge-file (as Megatron-LM's GPT-3 example scripts expect), the sentencepiece model
    given, else ids as text."""
    if tokenizer_type:
        return tokenizer_type
    if vocab_file and merge_file and not tokenizer_model:
        return "GPT2BPETokenizer"
    return "GPTSentencePieceTokenizer" if tokenizer_model else "NullTokenizer"


def tokenizer_flags(args) -> dict:
    """The tokenizer flags of an args Namespace or a plan's dict, Megatron-LM's defaults for those left out."""
    values = args if isinstance(args, dict) else vars(args)
    flags = {key: values[key] if values.get(key) is not None else default for key, default in TOKENIZER_FLAGS.items()}
    flags["tokenizer_type"] = default_tokenizer_type(flags["tokenizer_type"], flags["tokenizer_model"],
                                                     flags.get("vocab_file"), flags.get("merge_file"))
    return flags


def tokenizer_from_args(args):
    return build_tokenizer(**tokenizer_flags(args))


def _first_line(e: BaseException | str) -> str:
    text = str(e).strip()
    return text.splitlines()[0].rstrip(":. ") if text else type(e).__name__


def _check_inputs(tokenizer_type: str, files: dict) -> None:
    """The type's package is installed and the files it reads exist (a directory for HuggingFaceTokenizer)."""
    package = PACKAGES.get(tokenizer_type)
    if package and importlib.util.find_spec(package) is None:
        raise TokenizerError(f"--tokenizer-type {tokenizer_type} needs the {package} package, which is not installed "
                             "(pip install 'megagrow[hf]')")
    for dest in TOKENIZER_FILES[tokenizer_type]:
        flag, what = FILE_FLAGS[dest]
        path = files[dest]
        if not path:
            raise TokenizerError(f"{tokenizer_type} needs a {what} ({flag})")
        directory = tokenizer_type == "HuggingFaceTokenizer"
        if not os.path.exists(path):
            raise TokenizerError(f"{'tokenizer directory' if directory else what} not found: {path} ({flag})")
        if os.path.isdir(path) != directory:
            raise TokenizerError(f"{flag} {path}: " + ("not a directory (HuggingFaceTokenizer reads a local tokenizer "
                                                       "directory, as save_pretrained writes it)" if directory
                                                       else f"a directory, not a {what} file"))


def build_tokenizer(tokenizer_type: str, tokenizer_model: str | None = None, vocab_size: int | None = None,
                    vocab_extra_ids: int = 0, *, vocab_file: str | None = None, merge_file: str | None = None,
                    tiktoken_pattern: str | None = None, tiktoken_num_special_tokens: int = 1000,
                    tiktoken_special_tokens: list[str] | None = None):
    """A tokenizer from Megatron-LM's flags (`tokenizer_from_args` reads them from args). Raises TokenizerError.

    NullTokenizer reads space-separated ids and, as in Megatron-LM, adds an eod id after them:
    its vocab_size is `vocab_size + 1` and its eod is `vocab_size`.
    """
    if tokenizer_type not in TOKENIZER_FILES:
        raise TokenizerError(f"unknown tokenizer type: {tokenizer_type!r} "
                             f"(expected one of {', '.join(TOKENIZER_TYPES)})")
    if tokenizer_type == "NullTokenizer":
        if vocab_size is None or vocab_size < 1:
            raise TokenizerError("NullTokenizer needs a positive vocab size (--vocab-size)")
        return NullTokenizer(int(vocab_size))
    _check_inputs(tokenizer_type, {"tokenizer_model": tokenizer_model, "vocab_file": vocab_file,
                                   "merge_file": merge_file})
    if tokenizer_type == "HuggingFaceTokenizer":
        return _huggingface(tokenizer_model)
    if tokenizer_type == "GPT2BPETokenizer":
        return GPT2BPETokenizer(vocab_file, merge_file)
    if tokenizer_type == "TikTokenizer":
        return _tiktoken(tokenizer_model, tiktoken_pattern, tiktoken_num_special_tokens, tiktoken_special_tokens,
                         vocab_size)
    return MegatronLMSentencePiece(tokenizer_model, tokenizer_type == "SentencePieceTokenizer", vocab_extra_ids,
                                   name=tokenizer_type)


def _megatron_core_tokenizer(path: str, library: str, **kwargs):
    """megatron-core's text tokenizer of `library` (the same call in 0.16 and 0.19)."""
    from megatron.core.tokenizers import MegatronTokenizer
    return MegatronTokenizer.from_pretrained(tokenizer_path=os.path.abspath(path), metadata_path={"library": library},
                                             **kwargs)


# Files of which a tokenizer directory (save_pretrained's) holds at least one.
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


def _huggingface(path: str):
    """megatron-core's HuggingFaceTokenizer on a local directory, with Megatron-LM 0.16's defaults (no
    --tokenizer-hf-use-fast, no --tokenizer-hf-include-special-tokens: documents get no BOS/EOS of the
    tokenizer's own). eod is the tokenizer's eos token."""
    if not any(os.path.exists(os.path.join(path, name)) for name in HF_TOKENIZER_FILES):
        raise TokenizerError(f"--tokenizer-model {path}: not a Hugging Face tokenizer directory (none of "
                             f"{', '.join(HF_TOKENIZER_FILES)} in it)")
    # Only a local directory is read: transformers must not look anything up on the hub either.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        tokenizer = _megatron_core_tokenizer(path, "huggingface", use_fast=False, include_special_tokens=False,
                                             trust_remote_code=False)
    except (ValueError, OSError, TypeError, KeyError) as e:
        reason = re.sub(r"^Unable to instantiate HuggingFace AutoTokenizer for .*?Exception: ", "", str(e).strip())
        raise TokenizerError(f"--tokenizer-model {path}: not a Hugging Face tokenizer directory "
                             f"({_first_line(reason)})") from None
    if tokenizer.eod is None:
        raise TokenizerError(f"--tokenizer-model {path}: the tokenizer has no eos token (HuggingFaceTokenizer's eod)")
    return tokenizer


class GPT2BPETokenizer:
    """Megatron-LM's GPT2BPETokenizer: GPT-2's byte-level BPE from vocab.json and merges.txt (read with the
    `tokenizers` library, GPT-2's pre-split regex, no prefix space). eod is `<|endoftext|>`, also where the text
    spells it; there is no pad id. (megatron-core's own class resolves the files through the hub's `gpt2`.)"""

    EOD = "<|endoftext|>"
    pad = -1  # no pad id (GPTDataset masks the loss on labels equal to it)

    def __init__(self, vocab_file: str, merge_file: str):
        from tokenizers import ByteLevelBPETokenizer

        try:
            with open(vocab_file, encoding="utf-8") as f:
                vocab = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise TokenizerError(f"--vocab-file {vocab_file}: not GPT-2's vocab.json ({_first_line(e)})") from None
        if not isinstance(vocab, dict) or not all(isinstance(i, int) for i in vocab.values()):
            raise TokenizerError(f"--vocab-file {vocab_file}: not GPT-2's vocab.json (a JSON object of token ids)")
        if self.EOD not in vocab:
            raise TokenizerError(f"--vocab-file {vocab_file}: no {self.EOD} token (GPT2BPETokenizer's eod)")
        try:
            self._bpe = ByteLevelBPETokenizer(vocab_file, merge_file)
        except Exception as e:  # the tokenizers library raises plain Exceptions
            raise TokenizerError(f"--merge-file {merge_file}: not GPT-2 merges of --vocab-file {vocab_file} "
                                 f"({_first_line(e)})") from None
        self._bpe.add_special_tokens([self.EOD])  # already in the vocabulary: its id is kept
        self.vocab_size = len(vocab)
        self.eod = vocab[self.EOD]
        self.unique_identifiers = {"class": "GPT2BPETokenizer", "vocab_file": os.path.abspath(vocab_file),
                                   "merge_file": os.path.abspath(merge_file)}

    def tokenize(self, text: str) -> list[int]:
        return self._bpe.encode(text).ids

    def detokenize(self, ids: list[int]) -> str:
        return self._bpe.decode(list(ids), skip_special_tokens=False)


def _tiktoken(path: str, pattern: str | None, num_special: int, special_tokens: list[str] | None,
              vocab_size: int | None):
    """megatron-core's TikTokenTokenizer: ids below `num_special` are special tokens (the named ones first), then
    the file's first `vocab_size - num_special` tokens. eod is `</s>`, pad `<pad>`. (megatron-core 0.16's
    detokenize decodes token by token: a character split across tokens comes back as U+FFFD; ids are the same.)"""
    from megatron.core.tokenizers.text.libraries.tiktoken_tokenizer import DEFAULT_TIKTOKEN_MAX_VOCAB, SPECIAL_TOKENS

    vocab_size = vocab_size or DEFAULT_TIKTOKEN_MAX_VOCAB
    named = special_tokens or SPECIAL_TOKENS
    # What megatron-core asserts, said beforehand with the flags.
    missing = [t for t in SPECIAL_TOKENS if t not in named]
    if missing or len(set(named)) != len(named):
        raise TokenizerError(f"--tiktoken-special-tokens: must name each of {' '.join(SPECIAL_TOKENS)} once"
                             + (f" (missing {' '.join(missing)})" if missing else ""))
    if not len(named) <= num_special < vocab_size:
        raise TokenizerError(f"--tiktoken-num-special-tokens {num_special}: must be at least the {len(named)} named "
                             f"special tokens and below --vocab-size {vocab_size}")
    entries = _tiktoken_entries(path)
    if entries < vocab_size - num_special:
        raise TokenizerError(f"--tokenizer-model {path}: {entries} tokens, fewer than --vocab-size {vocab_size} "
                             f"minus --tiktoken-num-special-tokens {num_special}")
    kwargs = {"pattern": pattern} if pattern else {}
    try:
        return _megatron_core_tokenizer(path, "tiktoken", num_special_tokens=num_special, special_tokens=special_tokens,
                                        vocab_size=vocab_size, **kwargs)
    except (AssertionError, ValueError, KeyError, TypeError) as e:
        raise TokenizerError(f"--tokenizer-model {path}: not a TikTokenizer vocabulary ({_first_line(e)})") from None


def _tiktoken_entries(path: str) -> int:
    """The number of tokens of a tiktoken vocabulary as Megatron-LM reads it: a .json list of {rank,
    token_bytes (base64), token_str}, ranks 0..255 the single bytes."""
    what = "not a TikTokenizer vocabulary (a .json list of {rank, token_bytes, token_str}, as Megatron-LM reads it)"
    if not path.endswith(".json"):
        raise TokenizerError(f"--tokenizer-model {path}: {what}")
    try:
        with open(path, encoding="utf-8") as f:
            vocab = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise TokenizerError(f"--tokenizer-model {path}: {what}") from None
    if not isinstance(vocab, list) or not all(isinstance(x, dict) and x.keys() == {"rank", "token_bytes", "token_str"}
                                              and x["rank"] == i for i, x in enumerate(vocab)):
        raise TokenizerError(f"--tokenizer-model {path}: {what}")
    return len(vocab)


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
