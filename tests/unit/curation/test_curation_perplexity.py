"""Perplexity models on the built-in corpus: real text ranks below scrambled and random text in
every demo language, and the filter removes garbage while keeping held-out real text."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest

from megatron_ext.curation.builtin_corpus import DEMO_LANGUAGES, builtin_documents
from megatron_ext.curation.config import (
    CurationConfig,
    LangIdConfig,
    PerplexityConfig,
    QualityConfig,
)
from megatron_ext.curation.perplexity import (
    PerplexityFilter,
    load_kenlm,
    read_manifest,
    train_perplexity_models,
)
from megatron_ext.curation.pipeline import run_curation
from megatron_ext.curation.text import split_words
from megatron_ext.data.jsonl_io import iter_jsonl


def _pairs(split: str) -> list[tuple[str, str]]:
    return [(d["source_lang"], d["text"]) for d in builtin_documents(split=split)]


def _shuffled(text: str, rng: random.Random) -> str:
    words = split_words(text)
    rng.shuffle(words)
    return " ".join(words)


def _random_letters(text: str, lang: str, rng: random.Random) -> str:
    """Same word lengths, letters drawn uniformly from the code point range of the language's
    letters in the corpus."""
    letters = [ch for _, t in _pairs("train") + _pairs("heldout") if _ == lang for ch in t]
    points = [ord(ch) for ch in letters if ch.isalpha()]
    low, high = min(points), max(points)

    def letter() -> str:
        while True:
            ch = chr(rng.randint(low, high))
            if ch.isalpha():
                return ch

    return " ".join("".join(letter() for _ in w) for w in split_words(text))


@pytest.fixture(scope="module")
def heldout_models(tmp_path_factory):
    """Character 5-gram models on the train split, percentiles from the held-out split."""
    model_dir = tmp_path_factory.mktemp("ppl")
    train_perplexity_models(
        _pairs("train"), model_dir, order=5, unit="char", heldout_docs=_pairs("heldout")
    )
    return model_dir


def test_manifest_and_arpa_files(heldout_models):
    manifest = read_manifest(heldout_models)
    assert sorted(manifest["languages"]) == sorted(DEMO_LANGUAGES)
    for lang, entry in manifest["languages"].items():
        assert entry["percentiles_from"] == "heldout" and entry["percentile_docs"] >= 1
        assert np.all(np.diff(entry["percentiles"]) >= 0) and len(entry["percentiles"]) == 101
        assert load_kenlm(heldout_models / entry["arpa"]).order == 5, lang


@pytest.mark.parametrize("unit", ["char", "word"])
def test_real_text_ranks_below_shuffled_and_random(heldout_models, tmp_path, unit):
    model_dir = heldout_models
    if unit == "word":
        model_dir = tmp_path / "word"
        train_perplexity_models(
            _pairs("train"), model_dir, order=3, unit="word", heldout_docs=_pairs("heldout")
        )
    scorer = PerplexityFilter(PerplexityConfig(enabled=True), model_dir)
    rng = random.Random(0)
    for lang in DEMO_LANGUAGES:
        docs = [t for code, t in _pairs("heldout") if code == lang]
        real = [scorer.score(t, lang) for t in docs]
        shuffled = [scorer.score(_shuffled(t, rng), lang) for t in docs]
        garbage = [scorer.score(_random_letters(t, lang, rng), lang) for t in docs]
        mean_log = lambda values: float(np.mean(np.log(values)))  # noqa: E731
        assert mean_log(real) < mean_log(shuffled), (lang, real, shuffled)
        assert mean_log(real) < mean_log(garbage), (lang, real, garbage)
        if unit == "char":  # with characters the ranking holds document by document
            assert all(r < s < g for r, s, g in zip(real, shuffled, garbage)), lang


def test_filter_removes_garbage_and_keeps_real_text(tmp_path):
    # Percentiles come from every third training document; the held-out split is new text.
    model_dir = tmp_path / "models"
    train_perplexity_models(_pairs("train"), model_dir, order=5, unit="char", heldout_every=3)
    ppl_config = PerplexityConfig(enabled=True, model_dir=str(model_dir))
    scorer = PerplexityFilter(ppl_config, model_dir)
    rng = random.Random(1)
    records = []
    for lang, text in _pairs("heldout"):
        records.append({"text": text, "kind": "real", "source_lang": lang})
        garbage = _random_letters(text, lang, rng)
        assert scorer.judge(garbage, lang)[2] == "perplexity_too_high", (lang, garbage)
        records.append({"text": garbage, "kind": "garbage", "source_lang": lang})
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), "utf-8")
    config = CurationConfig(
        quality=QualityConfig(min_words=8),
        langid=LangIdConfig(languages=list(DEMO_LANGUAGES), keep_undetermined=True),
        perplexity=ppl_config,
    )
    report = run_curation(config, [str(path)], tmp_path / "out")
    out = [r.record for r in iter_jsonl([str(tmp_path / "out" / f) for f in report.output_files])]
    assert {r["kind"] for r in out} == {"real"}
    assert set(report.stats.total("perplexity").removed) <= {"perplexity_too_high"}
    for rec in out:
        assert rec["lang"] == rec["source_lang"]
        assert math.isfinite(rec["perplexity"]) and rec["ppl_bucket"] in ("head", "middle", "tail")
    # Every real document that reaches the perplexity stage survives it.
    config.perplexity = PerplexityConfig(enabled=False)
    baseline = run_curation(config, [str(path)], tmp_path / "no_ppl")
    before = [
        r.record for r in iter_jsonl([str(tmp_path / "no_ppl" / f) for f in baseline.output_files])
    ]
    assert [r["text"] for r in out] == [r["text"] for r in before if r["kind"] == "real"]
    assert len(out) >= len(records) // 2 - 2


def test_held_out_documents_without_words_fall_back_to_the_training_documents(tmp_path):
    """A language whose held-out documents normalise to nothing (digits, punctuation) takes
    its percentiles from the training documents instead of failing."""
    from megatron_ext.curation.perplexity import train_perplexity_models

    train = [("xx", "the cat sat on the mat and the dog sat on the log")] * 3
    manifest = train_perplexity_models(
        train, tmp_path / "models", heldout_docs=[("xx", "!!! ??? ... --")]
    )
    entry = manifest["languages"]["xx"]
    assert entry["percentiles_from"] == "train" and entry["percentile_docs"] == 3


def test_perplexity_filter_without_language_id_is_refused():
    from megatron_ext.config.errors import ConfigError
    from megatron_ext.curation.config import (
        CurationConfig,
        LangIdConfig,
        PerplexityConfig,
        validate_curation_config,
    )

    config = CurationConfig(
        langid=LangIdConfig(enabled=False),
        perplexity=PerplexityConfig(enabled=True, reference="builtin"),
    )
    with pytest.raises(ConfigError) as info:
        validate_curation_config(config)
    assert info.value.fields() == ["perplexity.enabled"]
