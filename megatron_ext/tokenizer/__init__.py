"""Tokenizer training (``training``) and loading (``load_tokenizer``)."""

from megatron_ext.tokenizer.loading import (
    TOKENIZER_TYPES,
    HuggingFaceTokenizer,
    SentencePieceTokenizer,
    load_tokenizer,
)

__all__ = ["TOKENIZER_TYPES", "HuggingFaceTokenizer", "SentencePieceTokenizer", "load_tokenizer"]
