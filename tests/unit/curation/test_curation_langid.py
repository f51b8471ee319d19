"""Language identification: accuracy on the built-in corpus, mixed and very short documents."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from megatron_ext.config.loader import load_config
from megatron_ext.curation.builtin_corpus import DEMO_LANGUAGES, builtin_documents
from megatron_ext.curation.cleaning import TextCleaner
from megatron_ext.curation.config import CurationConfig, LangIdConfig
from megatron_ext.curation.langid import UNDETERMINED, LanguageIdentifier

DEMO_CONFIG = Path(__file__).resolve().parents[3] / "examples/configs/curation_demo.yaml"
EN = (
    "Everyone has the right to education. Education shall be free, at least in the elementary "
    "and fundamental stages, and technical and professional education shall be made available."
)
FR = (
    "Toute personne a droit à l'éducation. L'éducation doit être gratuite, au moins en ce qui "
    "concerne l'enseignement élémentaire et fondamental, et l'enseignement technique doit être "
    "généralisé."
)


@pytest.fixture(scope="module")
def demo_config() -> CurationConfig:
    return load_config(CurationConfig, DEMO_CONFIG)


@pytest.fixture(scope="module")
def identifier(demo_config) -> LanguageIdentifier:
    return LanguageIdentifier(demo_config.langid)


def test_demo_config_keeps_the_builtin_languages(demo_config):
    assert sorted(demo_config.langid.languages) == sorted(DEMO_LANGUAGES)


def test_accuracy_per_kept_language(demo_config, identifier):
    """The text is held out for the identifier (fastText lid.176 never saw this corpus split)."""
    cleaner = TextCleaner(demo_config.cleaning)
    right, total = Counter(), Counter()
    for split in ("heldout", "train"):
        for doc in builtin_documents(demo_config.langid.languages, split):
            prediction = identifier.predict(cleaner.clean(doc["text"]))
            if prediction.lang == UNDETERMINED:
                continue  # too short by design, covered below
            total[doc["source_lang"]] += 1
            right[doc["source_lang"]] += prediction.lang == doc["source_lang"]
    for lang in demo_config.langid.languages:
        assert total[lang] >= 5, lang
        assert right[lang] / total[lang] >= 0.9, (lang, right[lang], total[lang])
    assert sum(right.values()) / sum(total.values()) >= 0.97


def test_mixed_language_documents_get_the_dominant_language(identifier):
    pure = identifier.predict(EN + " " + EN)
    mostly_english = identifier.predict(EN + " " + EN + " " + FR[:60])
    even = identifier.predict(EN + " " + FR)
    assert pure.lang == mostly_english.lang == "en"
    assert even.lang in ("en", "fr")
    assert even.score < pure.score
    config = LangIdConfig(languages=["en", "fr"], min_score=0.9)
    strict = LanguageIdentifier(config)
    assert strict.reject_reason(strict.predict(EN)) is None
    assert strict.reject_reason(even) == "low_language_score"


def test_short_documents_are_undetermined(identifier):
    assert identifier.predict("ok 42").lang == UNDETERMINED
    assert identifier.reject_reason(identifier.predict("ok 42")) == "undetermined_language"
    keep = LanguageIdentifier(LangIdConfig(keep_undetermined=True))
    assert keep.reject_reason(keep.predict("ok 42")) is None
    # Above min_letters a short sentence is classified normally.
    assert identifier.predict("Das ist ein kurzer deutscher Satz.").lang == "de"


def test_language_filter_and_per_language_threshold():
    lid = LanguageIdentifier(
        LangIdConfig(languages=["fr"], min_score=0.1, min_score_per_language={"fr": 0.999})
    )
    assert lid.reject_reason(lid.predict(EN)) == "language_not_kept"
    assert lid.reject_reason(lid.predict(FR)) == "low_language_score"
    assert lid.threshold("fr") == 0.999 and lid.threshold("de") == 0.1
