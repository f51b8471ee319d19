"""The modified Kneser-Ney trainer and its ARPA output, checked against the KenLM query library."""

from __future__ import annotations

import math
import random

import pytest

from megatron_ext.curation.kneser_ney import (
    BOS,
    EOS,
    FALLBACK_DISCOUNTS,
    adjusted_counts,
    compute_discounts,
    count_ngrams,
    read_arpa,
    train_kneser_ney,
    write_arpa,
)
from megatron_ext.curation.perplexity import load_kenlm


def _corpus(seed: int = 0, num: int = 300) -> list[list[str]]:
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(40)]
    return [
        [rng.choice(vocab[: rng.randint(4, 40)]) for _ in range(rng.randint(1, 12))]
        for _ in range(num)
    ]


def test_adjusted_counts_use_continuations_except_after_bos():
    raw = count_ngrams([["a", "b"], ["c", "b"], ["a", "b"]], order=2)
    assert raw[1][("a", "b")] == 2 and raw[0][("b",)] == 3
    adjusted = adjusted_counts(raw)
    assert adjusted[1][("a", "b")] == 2  # highest order: raw
    assert adjusted[0][("b",)] == 2  # preceded by a and c
    assert adjusted[0][("a",)] == 1  # preceded only by <s>
    assert adjusted[0][(EOS,)] == 1  # preceded only by b
    assert (BOS,) not in adjusted[0]


def test_discounts_follow_chen_goodman_and_fall_back():
    counts = {f"g{i}": c for i, c in enumerate([1] * 10 + [2] * 5 + [3] * 3 + [4] * 2 + [9])}
    (d1, d2, d3), fallback = compute_discounts(counts)
    y = 10 / (10 + 2 * 5)
    assert not fallback
    assert d1 == pytest.approx(1 - 2 * y * 5 / 10)
    assert d2 == pytest.approx(2 - 3 * y * 3 / 5)
    assert d3 == pytest.approx(3 - 4 * y * 2 / 3)
    assert compute_discounts({"a": 1, "b": 2}) == (FALLBACK_DISCOUNTS, True)


@pytest.mark.parametrize("order", [2, 3, 5])
def test_conditional_distributions_sum_to_one(order):
    model = train_kneser_ney(_corpus(), order)
    vocab = [w for (w,) in model.log10_probs[0] if w != BOS]
    for context in [(BOS,), ("w1",), ("w3", "w7"), (BOS, "w2"), ("unseen",), ("w1", "w2", "w3")]:
        total = sum(10 ** model.word_log10_prob(w, context) for w in vocab)
        assert total == pytest.approx(1.0, abs=1e-9), context


@pytest.mark.parametrize("order", [2, 4])
def test_arpa_loads_in_kenlm_and_scores_match(tmp_path, order):
    corpus = _corpus(seed=1)
    model = train_kneser_ney(corpus, order)
    path = tmp_path / "lm.arpa"
    write_arpa(model, path)
    kenlm_model = load_kenlm(path)
    assert kenlm_model.order == order
    reread = read_arpa(path)
    for sentence in corpus[:40] + [["never", "seen", "w1"], ["w2"]]:
        ours = model.sentence_log10_prob(sentence)
        theirs = kenlm_model.score(" ".join(sentence), bos=True, eos=True)
        assert theirs == pytest.approx(ours, abs=1e-4)
        assert reread.sentence_log10_prob(sentence) == pytest.approx(ours, abs=1e-4)


def test_seen_text_is_more_likely_than_scrambled(tmp_path):
    corpus = [["the", "cat", "sat", "on", "the", "mat"], ["the", "dog", "sat", "on", "the", "rug"]]
    model = train_kneser_ney(corpus * 5, 3)
    assert model.sentence_log10_prob(corpus[0]) > model.sentence_log10_prob(corpus[0][::-1])
    assert math.isfinite(model.sentence_log10_prob(["zebra"]))


def test_bad_orders_and_empty_corpus_are_errors():
    with pytest.raises(ValueError, match="order"):
        train_kneser_ney(_corpus(), 1)
    with pytest.raises(ValueError, match="empty"):
        train_kneser_ney([], 3)
