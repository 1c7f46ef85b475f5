"""Data: the embedded stdlib corpus, sentencepiece tokenizers, Megatron indexed GPT datasets.

Names are imported on first use, so that `megagrow.data.corpus` does not pull in megatron-core.
"""

_EXPORTS = {
    "write_stdlib_corpus": "megagrow.data.corpus",
    "train_sentencepiece": "megagrow.data.tokenizer",
    "build_tokenizer": "megagrow.data.tokenizer",
    "build_gpt_datasets": "megagrow.data.datasets",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib
    return getattr(importlib.import_module(_EXPORTS[name]), name)
