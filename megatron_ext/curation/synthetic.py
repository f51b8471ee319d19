"""Generated text for deduplication checks and benchmarks: distinct documents plus planted exact
and near copies at known word-edit rates, and a scorer for what a dedup run removed.

    records = planted_duplicate_corpus(num_distinct=200, seed=0)
    ...  # curate them
    scores = dedup_scores(records, kept_records)   # recall per kind, precision

Every record has ``text``, ``kind`` (``original``, ``exact``, ``near_0.05``, ...) and ``origin``
(the index of the original it copies).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from typing import Any

_CONSONANTS = "bcdfghjklmnprstvwz"
_VOWELS = "aeiou"


def synthetic_vocabulary(size: int, seed: int = 0) -> list[str]:
    """Distinct pronounceable lowercase words (2-5 syllables)."""
    rng = random.Random(seed)
    words: set[str] = set()
    while len(words) < size:
        syllables = rng.randint(1, 4)
        words.add("".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(syllables)))
    return sorted(words)


def synthetic_document(rng: random.Random, vocab: Sequence[str], num_words: int) -> str:
    """Sentences of 6-18 words drawn with a Zipf-like skew, capitalised and punctuated."""
    weights = [1.0 / (rank + 1) ** 0.8 for rank in range(len(vocab))]
    words = rng.choices(vocab, weights=weights, k=num_words)
    sentences, start = [], 0
    while start < num_words:
        end = min(num_words, start + rng.randint(6, 18))
        sentence = " ".join(words[start:end])
        sentences.append(sentence[0].upper() + sentence[1:] + ".")
        start = end
    return " ".join(sentences)


def edit_words(text: str, rate: float, rng: random.Random, vocab: Sequence[str]) -> str:
    """Replace ``round(rate * words)`` distinct word positions by other vocabulary words."""
    words = text.split(" ")
    positions = rng.sample(range(len(words)), round(rate * len(words)))
    for pos in positions:
        tail = "." if words[pos].endswith(".") else ""
        current = words[pos].rstrip(".").lower()
        replacement = current
        while replacement == current:
            replacement = rng.choice(vocab)
        words[pos] = replacement + tail
    return " ".join(words)


def planted_duplicate_corpus(
    num_distinct: int = 120,
    edit_rates: Sequence[float] = (0.02, 0.05, 0.10, 0.30),
    copies_per_rate: int = 20,
    num_exact: int = 20,
    words_per_doc: int = 200,
    vocab_size: int = 3000,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Originals first, then exact copies (re-spaced and re-cased) and near copies, shuffled."""
    rng = random.Random(seed)
    vocab = synthetic_vocabulary(vocab_size, seed)
    originals = [synthetic_document(rng, vocab, words_per_doc) for _ in range(num_distinct)]
    records: list[dict[str, Any]] = [
        {"text": text, "kind": "original", "origin": i} for i, text in enumerate(originals)
    ]
    copies: list[dict[str, Any]] = []
    for origin in rng.sample(range(num_distinct), num_exact):
        # Case and spacing differences are normalised away by exact dedup.
        text = originals[origin].upper().replace(" ", "  ", 3)
        copies.append({"text": text, "kind": "exact", "origin": origin})
    for rate in edit_rates:
        for origin in rng.sample(range(num_distinct), copies_per_rate):
            text = edit_words(originals[origin], rate, rng, vocab)
            copies.append({"text": text, "kind": f"near_{rate:.2f}", "origin": origin})
    rng.shuffle(copies)
    return records + copies


def dedup_scores(
    records: Sequence[dict[str, Any]], kept_texts: Iterable[str], normalize=None
) -> dict[str, Any]:
    """Recall per planted kind (share of copies removed) and precision (share of removed
    documents that were copies), given the texts that survived."""
    normalize = normalize or (lambda t: " ".join(t.split()))
    kept = {normalize(t) for t in kept_texts}
    removed: dict[str, int] = {}
    totals: dict[str, int] = {}
    for rec in records:
        totals[rec["kind"]] = totals.get(rec["kind"], 0) + 1
        if normalize(rec["text"]) not in kept:
            removed[rec["kind"]] = removed.get(rec["kind"], 0) + 1
    all_removed = sum(removed.values())
    copies_removed = all_removed - removed.get("original", 0)
    return {
        "recall": {
            kind: removed.get(kind, 0) / totals[kind]
            for kind in sorted(totals)
            if kind != "original"
        },
        "originals_removed": removed.get("original", 0),
        "precision": copies_removed / all_removed if all_removed else 1.0,
    }
