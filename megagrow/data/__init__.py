"""Data: the embedded stdlib corpus, sentencepiece tokenizers, Megatron indexed datasets."""
