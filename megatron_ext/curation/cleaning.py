"""Stage 1a: text cleaning and normalisation.

In order: broken-encoding repair (ftfy), Unicode normalisation (NFC by default), removal of
control and invisible format characters, whitespace normalisation, and removal of short
boilerplate lines (cookie banners, legal footers, navigation) in the style of C4.
"""

from __future__ import annotations

import re
import unicodedata

import ftfy

from megatron_ext.curation.config import CleaningConfig
from megatron_ext.curation.text import split_words

# C0/C1 controls except tab and newline, plus invisible format characters that carry no text
# (the zero-width space is removed; the zero-width joiner and non-joiner are kept: ZWJ/ZWNJ
# matter in Indic and Persian scripts).
_CONTROL_RE = re.compile(
    "[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b\u2060\ufeff\ufff9-\ufffb\u00ad]"
)
# Runs of horizontal whitespace other than a single plain space (matching every space is slow).
_SPACE_RUN_RE = re.compile(r"[^\S\n]{2,}|[^\S\n ]")
_BLANK_RUN_RE = re.compile(r"\n{3,}")
# ftfy repairs broken encodings (mojibake, HTML entities, Latin ligatures of PDF extractions) and
# leaves correct text alone: its defaults would also turn CJK fullwidth punctuation and digits into
# ASCII and straighten curly quotes, which are the text's own spelling.
_FTFY = ftfy.TextFixerConfig(fix_character_width=False, uncurl_quotes=False, normalization=None)


class TextCleaner:
    """Applies the configured cleaning steps to one document at a time."""

    def __init__(self, config: CleaningConfig):
        self.config = config
        patterns = "|".join(f"(?:{p})" for p in config.boilerplate_patterns)
        self._boilerplate = re.compile(patterns, re.IGNORECASE) if patterns else None

    def clean(self, text: str) -> str:
        cfg = self.config
        if not cfg.enabled:
            return text
        if cfg.fix_encoding and not (text.isascii() and "&" not in text):
            # Mojibake needs non-ASCII characters and HTML entities need '&': plain ASCII text
            # skips ftfy, the slowest step. NFC is applied below, not by ftfy.
            text = ftfy.fix_text(text, config=_FTFY)
        if cfg.unicode_normalization != "none":
            text = unicodedata.normalize(cfg.unicode_normalization, text)
        if cfg.remove_control_chars:
            text = text.replace("\r\n", "\n").replace("\r", "\n")
            text = _CONTROL_RE.sub("", text)
        if cfg.normalize_whitespace:
            text = "\n".join(_SPACE_RUN_RE.sub(" ", line).strip() for line in text.split("\n"))
            text = _BLANK_RUN_RE.sub("\n\n", text).strip()
        if cfg.remove_boilerplate_lines and self._boilerplate is not None:
            text = self._drop_boilerplate(text)
        return text

    def is_boilerplate(self, line: str) -> bool:
        limit = self.config.boilerplate_max_words
        # A stripped line with k single spaces has more than k words: long lines skip the regex.
        if self._boilerplate is None or line.count(" ") >= limit:
            return False
        return len(split_words(line)) <= limit and self._boilerplate.search(line) is not None

    def _drop_boilerplate(self, text: str) -> str:
        lines = text.split("\n")
        kept = [line for line in lines if not (line.strip() and self.is_boilerplate(line))]
        if len(kept) == len(lines):
            return text
        return _BLANK_RUN_RE.sub("\n\n", "\n".join(kept)).strip()
