"""Cleaning/normalisation and the Gopher/C4-style quality rules."""

from __future__ import annotations

import unicodedata

import pytest

from megatron_ext.curation.builtin_corpus import builtin_documents
from megatron_ext.curation.cleaning import TextCleaner
from megatron_ext.curation.config import CleaningConfig, QualityConfig
from megatron_ext.curation.quality import QualityFilter

PROSE = (
    "The committee met on Tuesday to discuss the budget for the coming year. Members agreed "
    "that the library needs new shelves, better lighting and longer opening hours for students. "
    "After a long debate they voted to move part of the sports budget to the library, and the "
    "chair promised to publish the minutes before the end of the month so that everyone could "
    "read the arguments for and against the decision."
)


def test_cleaning_repairs_normalises_and_strips():
    cleaner = TextCleaner(CleaningConfig())
    broken = (
        "cafÃ© na\u0131\u0308ve\x00\x07 text\u200b with   spaces\t\tand\r\nlines  \n\n\n\nend\ufeff"
    )
    cleaned = cleaner.clean(broken)
    assert cleaned.startswith("café")
    assert cleaned == unicodedata.normalize("NFC", cleaned)
    assert "\x00" not in cleaned and "\x07" not in cleaned and "\u200b" not in cleaned
    assert "\ufeff" not in cleaned and "\r" not in cleaned
    assert "text with spaces and\nlines\n\nend" in cleaned
    # Decomposed e + combining acute becomes the single precomposed character.
    assert cleaner.clean("e\u0301t\u00e9") == "\u00e9t\u00e9"
    # Correct text is left as it is written: CJK fullwidth punctuation and digits, curly quotes.
    for kept in (
        "你好，世界！这是（测试）：１２３。",
        "\u201cQuoted\u201d l\u2019\u00e9t\u00e9 & more",
    ):
        assert cleaner.clean(kept) == kept
    assert cleaner.clean("fish &amp; chips, \ufb01ne") == "fish & chips, fine"


def test_cleaning_keeps_zwnj_and_can_be_disabled():
    cleaner = TextCleaner(CleaningConfig())
    persian = "می\u200cخواهم"  # the zero-width non-joiner is part of Persian spelling
    assert cleaner.clean(persian) == persian
    raw = "a \x00  b"
    assert TextCleaner(CleaningConfig(enabled=False)).clean(raw) == raw


def test_boilerplate_lines_removed_only_when_short():
    cleaner = TextCleaner(CleaningConfig())
    text = "\n".join(
        [
            "We use cookies to improve your experience. Accept cookies?",
            PROSE,
            "© 2024 Example Inc. All rights reserved.",
            "Read more",
            "Our privacy policy " + "is long and this line is real content about it " * 5,
        ]
    )
    lines = cleaner.clean(text).split("\n")
    assert lines[0] == PROSE
    assert len(lines) == 2 and lines[1].startswith("Our privacy policy")


def _quality(**overrides) -> QualityFilter:
    return QualityFilter(QualityConfig(**overrides))


@pytest.mark.parametrize(
    "text, reason",
    [
        ("too short to be a document", "too_few_words"),
        (PROSE + " lorem ipsum dolor", "lorem_ipsum"),
        ("supercalifragilisticexpialidocious " * 60, "mean_word_length"),
        (PROSE + " #tag" * 20, "symbol_word_ratio"),
        ("1234 5678 " * 40 + PROSE, "alpha_words"),
        (
            "\n".join(["• item number one with several words in it"] * 3 + [f"• {PROSE}"]),
            "bullet_lines",
        ),
        (
            "\n".join([f"line {i} of a teaser that stops..." for i in range(10)] + [PROSE]),
            "ellipsis_lines",
        ),
        ("\n".join(["the same line repeated here and again"] * 6 + [PROSE]), "duplicate_lines"),
        (PROSE + " buy now buy now" * 30, "top_2gram_chars"),
        (PROSE + " " + " ".join(PROSE.split()[:20]) * 2, "duplicate_5gram_chars"),
        ("ref1234567890 code " * 30 + PROSE, "digit_chars"),
    ],
)
def test_quality_rules_fire(text, reason):
    assert _quality().check(text) == reason


def test_quality_passes_prose_and_thresholds_are_configurable():
    assert _quality().check(PROSE) is None
    assert _quality(min_words=500).check(PROSE) == "too_few_words"
    assert _quality(enabled=False).check("x") is None
    assert _quality(reject_curly_braces=True).check(PROSE + " { code }") == "curly_braces"


def test_quality_script_aware_for_cjk_and_hangul():
    # Every CJK character counts as a word; Korean and Chinese skip the word-length bounds.
    quality = _quality(min_words=8)
    for doc in builtin_documents(["zh", "ja", "ko", "hi", "ar"]):
        assert quality.check(doc["text"]) is None, doc
    assert _quality(min_words=50).check("人人生而自由") == "too_few_words"


REPETITION_RULES = {f"top_{n}gram_chars" for n in (2, 3, 4)} | {
    f"duplicate_{n}gram_chars" for n in range(5, 11)
}


def test_quality_keeps_southeast_asian_scripts_and_long_abugida_words():
    """Thai, Lao, Khmer and Myanmar write vowels and tones as combining marks: a consonant with
    its marks is one word, not several words without a letter. Malayalam and Tamil words are
    long in code points because of their vowel signs; the upper length bound counts letters."""
    from megatron_ext.curation.text import split_words

    assert split_words("ที่นี่") == ["ที่", "นี่"]  # consonant + vowel sign + tone mark, twice
    assert split_words("ស្រី") == ["ស្", "រី"]  # Khmer: the coeng sign stays with its consonant
    quality = _quality(min_words=8)
    reasons = {
        lang: [quality.check(doc["text"]) for doc in builtin_documents([lang])]
        for lang in ("th", "lo", "km", "my", "ml", "ta")
    }
    for lang, found in reasons.items():
        # What is left out is repeated character n-grams (docs/curation.md: Limits).
        assert found.count(None) >= 4, (lang, found)
        assert {r for r in found if r is not None} <= REPETITION_RULES, (lang, found)
    # Words of an unmarked script are still held to the upper bound, marks to the lower one.
    assert _quality().check("abcdefghijkl " * 60) == "mean_word_length"
    assert _quality().check("\u0915\u0947 " * 60) == "mean_word_length"  # Devanagari "ke": 2
