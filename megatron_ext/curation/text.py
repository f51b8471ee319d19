"""Script-aware word splitting shared by the quality rules, deduplication and the n-gram model.

Languages written without spaces (Chinese, Japanese, Thai, ...) have no whitespace words, so
every character of those scripts counts as one word; everywhere else a word is a run of
non-space characters. ``normalized_words`` is the form deduplication and the n-gram model see:
casefolded, punctuation dropped, digits mapped to ``0``.
"""

from __future__ import annotations

import functools
import re
import sys
import unicodedata

# Scripts written without spaces between words: Thai, Lao, Khmer, Myanmar, CJK punctuation-free
# ranges (Hiragana, Katakana, CJK ideographs and extensions, compatibility ideographs).
_UNSPACED = (
    "\u0e00-\u0e7f"  # Thai
    "\u0e80-\u0eff"  # Lao
    "\u1000-\u109f"  # Myanmar
    "\u1780-\u17ff"  # Khmer
    "\u3040-\u30ff"  # Hiragana, Katakana
    "\u3400-\u4dbf"  # CJK extension A
    "\u4e00-\u9fff"  # CJK unified ideographs
    "\uf900-\ufaff"  # CJK compatibility ideographs
    "\U00020000-\U0002ffff"  # CJK extensions B-F
)
UNSPACED_CHARS = _UNSPACED
"""Character class body (for ``[...]``) of the scripts whose characters count as words."""
_WORD_RE = re.compile(rf"[{_UNSPACED}]|[^\s{_UNSPACED}]+")
_UNSPACED_RE = re.compile(rf"[{_UNSPACED}]")
_DIGIT_RE = re.compile(r"\d")


def split_words(text: str) -> list[str]:
    """Whitespace words, with each character of an unspaced script as its own word."""
    return _WORD_RE.findall(text)


@functools.cache
def _normalize_table() -> dict[int, int | None]:
    # Built once per process (about 0.3 s): punctuation and symbols map to a space, digits to 0.
    table: dict[int, int | None] = {}
    for code in range(sys.maxunicode + 1):
        category = unicodedata.category(chr(code))
        if category[0] in "PS":
            table[code] = 0x20
        elif category == "Nd":
            table[code] = 0x30
    return table


def normalized_words(text: str) -> list[str]:
    """Casefolded words, punctuation and symbols removed, every decimal digit mapped to 0."""
    return split_words(text.casefold().translate(_normalize_table()))
