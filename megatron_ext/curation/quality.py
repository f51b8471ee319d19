"""Stage 1b: document quality rules in the style of Gopher (Rae et al., 2021) and C4.

``QualityFilter.check(text)`` returns ``None`` for a document that passes, or the name of the
first rule it fails (the name is what the report counts). Words are counted script-aware
(``megatron_ext.curation.text``): each CJK/Thai character is a word, so the same thresholds
apply to Chinese and Japanese.
"""

from __future__ import annotations

import re
from collections import Counter

from megatron_ext.curation.config import QualityConfig
from megatron_ext.curation.text import (
    deletion_table,
    normalized_words,
    split_words,
    unspaced_words,
    without_marks,
)

_HANGUL_WORD_RE = re.compile("\\S*[\uac00-\ud7af]\\S*")
_LETTER_RE = re.compile(r"[^\W\d_]")
_DIGIT_RE = re.compile(r"\d")
_BULLETS = ("•", "●", "◦", "▪", "‣", "⁃", "∙", "·", "*", "-", "–", "—", "→", "►")


class QualityFilter:
    """The configured quality rules, applied in a fixed order."""

    def __init__(self, config: QualityConfig):
        self.config = config

    def check(self, text: str) -> str | None:
        cfg = self.config
        if not cfg.enabled:
            return None
        lowered = text.casefold()
        if cfg.reject_lorem_ipsum and "lorem ipsum" in lowered:
            return "lorem_ipsum"
        if cfg.reject_curly_braces and "{" in text:
            return "curly_braces"
        words = split_words(text)
        num_words = len(words)
        if num_words < cfg.min_words:
            return "too_few_words"
        if num_words > cfg.max_words:
            return "too_many_words"
        reason = self._check_words(text, words)
        if reason:
            return reason
        reason = self._check_lines(text)
        if reason:
            return reason
        return self._check_repetition(normalized_words(text))

    def _check_words(self, text: str, words: list[str]) -> str | None:
        cfg = self.config
        num_words = len(words)
        num_chars = sum(map(len, words))
        # The Gopher length bounds are calibrated on alphabetic scripts: leave out the words of
        # unspaced scripts (a character with its marks each) and Hangul words (a syllable block
        # holds 2-3 letters). Combining marks (Indic vowel signs and viramas) count towards the
        # lower bound but not the upper one: long words of agglutinative languages written in
        # abugidas (Malayalam, Tamil) are ordinary text, and neither bound gets stricter.
        unspaced = unspaced_words(text)
        hangul_words = _HANGUL_WORD_RE.findall(text)
        num_alphabetic = num_words - len(unspaced) - len(hangul_words)
        if num_alphabetic * 2 > num_words:
            hangul_chars = sum(map(len, hangul_words))
            chars = num_chars - sum(map(len, unspaced)) - hangul_chars
            letters = sum(map(len, without_marks(text).split())) - len(unspaced) - hangul_chars
            if (
                chars / num_alphabetic < cfg.min_mean_word_length
                or letters / num_alphabetic > cfg.max_mean_word_length
            ):
                return "mean_word_length"
        symbols = text.count("#") + text.count("...") + text.count("…")
        if symbols / num_words > cfg.max_symbol_word_ratio:
            return "symbol_word_ratio"
        without_letter = [w for w in words if not _LETTER_RE.search(w)]
        # Stand-alone punctuation (CJK commas and full stops, dashes) is not a word here.
        punctuation_only = sum(1 for w in without_letter if not w.translate(deletion_table("P")))
        counted = num_words - punctuation_only
        with_letter = num_words - len(without_letter)
        if not counted or with_letter / counted < cfg.min_alpha_word_fraction:
            return "alpha_words"
        digits = len(_DIGIT_RE.findall(text))
        if num_chars and digits / num_chars > cfg.max_digit_char_fraction:
            return "digit_chars"
        return None

    def _check_lines(self, text: str) -> str | None:
        cfg = self.config
        lines = [line.strip() for line in text.split("\n") if line.strip()]
        if not lines:
            return None
        bullets = sum(1 for line in lines if line.startswith(_BULLETS))
        if bullets / len(lines) > cfg.max_bullet_line_fraction:
            return "bullet_lines"
        ellipsis = sum(1 for line in lines if line.endswith(("...", "…")))
        if ellipsis / len(lines) > cfg.max_ellipsis_line_fraction:
            return "ellipsis_lines"
        seen: set[str] = set()
        dup_lines = dup_chars = 0
        for line in lines:
            if line in seen:
                dup_lines += 1
                dup_chars += len(line)
            seen.add(line)
        if dup_lines / len(lines) > cfg.max_duplicate_line_fraction:
            return "duplicate_lines"
        total_chars = sum(len(line) for line in lines)
        if dup_chars / total_chars > cfg.max_duplicate_line_char_fraction:
            return "duplicate_line_chars"
        return None

    def _check_repetition(self, words: list[str]) -> str | None:
        cfg = self.config
        total_chars = sum(len(w) for w in words)
        if total_chars == 0:
            return "alpha_words"
        for n, limit in zip((2, 3, 4), cfg.max_top_ngram_char_fractions):
            if len(words) < n:
                break
            counts = Counter(zip(*(words[i:] for i in range(n))))
            gram, count = counts.most_common(1)[0]
            if count > 1 and count * sum(len(w) for w in gram) / total_chars > limit:
                return f"top_{n}gram_chars"
        limits = cfg.max_duplicate_ngram_char_fractions
        for n, limit in zip(range(5, 11), limits):
            if len(words) < n:
                break
            grams = list(zip(*(words[i:] for i in range(n))))
            counts = Counter(grams)
            covered = bytearray(len(words))
            for start, gram in enumerate(grams):
                if counts[gram] > 1:
                    covered[start : start + n] = b"\x01" * n
            dup_chars = sum(len(w) for w, flag in zip(words, covered) if flag)
            if dup_chars / total_chars > limit:
                return f"duplicate_{n}gram_chars"
            # Positions inside a repeated (n+1)-gram are inside repeated n-grams, so the share
            # only shrinks with n: below every remaining limit, no longer n can fail.
            if dup_chars / total_chars <= min(limits[n - 5 :]):
                break
        return None
