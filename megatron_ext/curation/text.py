"""Script-aware word splitting shared by the quality rules, deduplication and the n-gram model.

Languages written without spaces (Chinese, Japanese, Thai, ...) have no whitespace words, so
every character of those scripts counts as one word, together with the combining marks that
follow it (Thai, Lao, Khmer and Myanmar write vowels and tones as marks on a consonant: a mark is
not a word of its own); everywhere else a word is a run of non-space characters.
``normalized_words`` is the form deduplication and the n-gram model see: casefolded, punctuation
dropped, digits mapped to ``0``.
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


def _marks_of(ranges: str) -> str:
    """Character class body of the combining marks (categories Mn, Mc, Me) in ``ranges``."""
    codes = []
    for low, high in re.findall(r"(.)-(.)", ranges, flags=re.DOTALL):
        codes += [
            c for c in range(ord(low), ord(high) + 1) if unicodedata.category(chr(c))[0] == "M"
        ]
    return "".join(chr(c) for c in codes)


# Marks that join the character before them: those of the unspaced scripts and the generic
# combining blocks (diacritics, marks for symbols, half marks).
_JOINING_MARKS = (
    _marks_of(_UNSPACED) + "\u0300-\u036f\u1ab0-\u1aff\u1dc0-\u1dff\u20d0-\u20ff\ufe20-\ufe2f"
)
_UNSPACED_WORD = rf"[{_UNSPACED}][{_JOINING_MARKS}]*"
_WORD_RE = re.compile(rf"{_UNSPACED_WORD}|[^\s{_UNSPACED}]+")
_UNSPACED_WORD_RE = re.compile(_UNSPACED_WORD)
_DIGIT_RE = re.compile(r"\d")


def split_words(text: str) -> list[str]:
    """Whitespace words, with each character of an unspaced script (and its marks) as a word."""
    return _WORD_RE.findall(text)


def unspaced_words(text: str) -> list[str]:
    """The words of ``split_words`` that are characters of unspaced scripts (with their marks)."""
    return _UNSPACED_WORD_RE.findall(text)


@functools.cache
def deletion_table(category: str) -> dict[int, None]:
    """A ``str.translate`` table that deletes every character whose Unicode category starts
    with ``category`` (``"P"``: punctuation, ``"M"``: combining marks); built once per process
    and category (about 0.3 s)."""
    return {
        code: None
        for code in range(sys.maxunicode + 1)
        if unicodedata.category(chr(code)).startswith(category)
    }


def without_marks(text: str) -> str:
    """``text`` without its combining marks (Indic vowel signs and viramas, accents written
    apart): what is left counts letters the way a reader of an alphabet counts them."""
    return text.translate(deletion_table("M"))


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
