"""Per-language compression of tokenizers on held-out text, side by side.

Tokens per word counts whitespace-separated words, which is meaningless for scripts written
without spaces (Chinese, Japanese, Thai): compare those on tokens per byte and characters per
token instead. Lower tokens per word / per byte is better.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def compression_stats(tokenizer: Any, texts: Sequence[str]) -> dict[str, float]:
    """Token, word, byte and character counts of ``texts`` and the ratios between them."""
    num_tokens = sum(len(ids) for ids in tokenizer.tokenize_batch(list(texts))) if texts else 0
    num_words = sum(len(text.split()) for text in texts)
    num_bytes = sum(len(text.encode("utf-8")) for text in texts)
    num_chars = sum(len(text) for text in texts)
    return {
        "tokens": num_tokens,
        "words": num_words,
        "bytes": num_bytes,
        "chars": num_chars,
        "tokens_per_word": num_tokens / num_words if num_words else 0.0,
        "tokens_per_byte": num_tokens / num_bytes if num_bytes else 0.0,
        "chars_per_token": num_chars / num_tokens if num_tokens else 0.0,
    }


def compare_tokenizers(
    heldout: Mapping[str, Sequence[str]], tokenizers: Mapping[str, Any]
) -> dict[str, dict[str, dict[str, float]]]:
    """``{language: {tokenizer name: compression_stats}}`` for every held-out language."""
    return {
        lang: {name: compression_stats(tok, texts) for name, tok in tokenizers.items()}
        for lang, texts in sorted(heldout.items())
    }


def format_comparison(comparison: Mapping[str, Mapping[str, Mapping[str, float]]]) -> str:
    """A Markdown table: one row per language, tokens/word and tokens/byte per tokenizer."""
    if not comparison:
        return "(no held-out text)\n"
    names = list(next(iter(comparison.values())).keys())
    header = ["language", "held-out bytes"]
    for name in names:
        header += [f"{name} tok/word", f"{name} tok/byte"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for lang, per_tok in comparison.items():
        row = [lang, str(int(next(iter(per_tok.values()))["bytes"]))]
        for name in names:
            stats = per_tok[name]
            row += [f"{stats['tokens_per_word']:.3f}", f"{stats['tokens_per_byte']:.4f}"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"
