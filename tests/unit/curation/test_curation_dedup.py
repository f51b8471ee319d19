"""Exact and near deduplication: planted duplicates, cluster representatives, MinHash quality."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from megatron_ext.curation.config import (
    CurationConfig,
    ExactDedupConfig,
    LangIdConfig,
    NearDedupConfig,
    QualityConfig,
    near_dedup_threshold,
)
from megatron_ext.curation.dedup import (
    MinHasher,
    exact_duplicate_mask,
    exact_key,
    near_duplicate_mask,
    shingle_hashes,
)
from megatron_ext.curation.pipeline import run_curation
from megatron_ext.curation.synthetic import (
    dedup_scores,
    edit_words,
    planted_duplicate_corpus,
    synthetic_document,
    synthetic_vocabulary,
)
from megatron_ext.curation.text import normalized_words
from megatron_ext.data.jsonl_io import iter_jsonl


def _dedup_only_config() -> CurationConfig:
    return CurationConfig(
        quality=QualityConfig(enabled=False),
        langid=LangIdConfig(enabled=False),
    )


def test_planted_duplicates_recall_and_precision(tmp_path):
    records = planted_duplicate_corpus(num_distinct=120, copies_per_rate=20, num_exact=20, seed=3)
    originals = [r for r in records if r["kind"] == "original"]
    copies = [r for r in records if r["kind"] != "original"]
    # Two input files: dedup must work across them (file names sort originals first).
    for name, part in (("a.jsonl", originals), ("b.jsonl", copies)):
        with open(tmp_path / name, "w", encoding="utf-8") as out:
            out.writelines(json.dumps(r) + "\n" for r in part)
    report = run_curation(_dedup_only_config(), [str(tmp_path / "*.jsonl")], tmp_path / "out")
    kept = [r.text for r in iter_jsonl([str(tmp_path / "out" / f) for f in report.output_files])]
    scores = dedup_scores(records, kept)
    print("planted duplicates:", json.dumps(scores))
    assert scores["originals_removed"] == 0
    assert scores["precision"] == 1.0
    assert scores["recall"]["exact"] == 1.0
    for rate in ("0.02", "0.05", "0.10"):
        assert scores["recall"][f"near_{rate}"] == 1.0, scores
    # A 30% rewrite is mostly a different document; only some are expected to be caught.
    assert scores["recall"]["near_0.30"] < 1.0
    stages = report.stats
    assert stages.total("exact_dedup").removed == {"exact_duplicate": 20}
    removed_near = stages.total("near_dedup").removed["near_duplicate"]
    assert removed_near == round(
        sum(20 * scores["recall"][f"near_{r}"] for r in ("0.02", "0.05", "0.10", "0.30"))
    )


def test_exact_key_normalisation():
    cfg = ExactDedupConfig()
    assert exact_key("Hello   World\n", cfg) == exact_key("hello world", cfg)
    assert exact_key("Hello World", ExactDedupConfig(casefold=False)) != exact_key(
        "hello world", cfg
    )
    loose = ExactDedupConfig(ignore_punctuation=True)
    assert exact_key("Hello, world!", loose) == exact_key("hello world", loose)
    assert exact_key("Hello, world!", cfg) != exact_key("hello world", cfg)


def test_exact_mask_keeps_first_occurrence():
    keys = np.array([[1] * 16, [2] * 16, [1] * 16, [3] * 16, [2] * 16, [1] * 16], dtype=np.uint8)
    assert exact_duplicate_mask(keys).tolist() == [False, False, True, False, True, True]
    assert exact_duplicate_mask(np.zeros((0, 16), dtype=np.uint8)).tolist() == []


def test_near_mask_keeps_first_of_each_cluster_through_chains():
    # Docs 0-3: 3 links to 1 in band 0, 1 links to 4 in band 1: cluster {1, 3, 4} keeps 1.
    keys = np.array(
        [[10, 20], [11, 21], [12, 22], [11, 23], [14, 21], [15, 25], [16, 25]], dtype=np.uint64
    )
    assert near_duplicate_mask(keys).tolist() == [False, False, False, True, True, False, True]


def test_minhash_estimates_jaccard_and_threshold_formula():
    cfg = NearDedupConfig(num_bands=32, rows_per_band=4)
    assert near_dedup_threshold(14, 8) == pytest.approx(0.719, abs=1e-3)
    hasher = MinHasher(cfg)
    rng = random.Random(0)
    vocab = synthetic_vocabulary(2000)
    errors = []
    for rate in (0.0, 0.05, 0.1, 0.2, 0.4):
        base = synthetic_document(rng, vocab, 300)
        other = edit_words(base, rate, rng, vocab)
        a = set(shingle_hashes(normalized_words(base), cfg.ngram_size).tolist())
        b = set(shingle_hashes(normalized_words(other), cfg.ngram_size).tolist())
        true = len(a & b) / len(a | b)
        estimate = float(np.mean(hasher.signature(base) == hasher.signature(other)))
        errors.append(abs(true - estimate))
    # 128 permutations: standard error <= 0.045.
    assert max(errors) < 0.15 and np.mean(errors) < 0.07


def test_minhash_is_deterministic_across_instances_and_short_texts():
    cfg = NearDedupConfig()
    text = "Un texte assez court."
    a, b = MinHasher(cfg), MinHasher(cfg)
    assert np.array_equal(a.band_keys(a.signature(text)), b.band_keys(b.signature(text)))
    assert a.signature("deux").shape == (cfg.num_bands * cfg.rows_per_band,)
    other_seed = MinHasher(NearDedupConfig(seed=2))
    assert not np.array_equal(a.signature(text), other_seed.signature(text))


def test_documents_without_words_are_not_near_duplicates_of_each_other(tmp_path):
    texts = [
        "!!! ??? ... ,,,",
        "😀😀😀 🎉🎉",
        "Ordinary words make a document here.",
        "%%% ### @@@",
    ]
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    report = run_curation(_dedup_only_config(), [str(path)], tmp_path / "out")
    assert report.stats.total("near_dedup").removed == {}
    assert report.docs_written == len(texts)
    assert MinHasher(NearDedupConfig()).text_band_keys(texts[0]) is None
