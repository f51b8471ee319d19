"""The built-in multilingual corpus made from gflanguages' UDHR texts."""

from __future__ import annotations

import json
import unicodedata

import pytest

from megatron_ext.curation.builtin_corpus import (
    DEMO_LANGUAGES,
    MIN_WORDS,
    builtin_documents,
    write_builtin_corpus,
)
from megatron_ext.curation.text import split_words


def _scripts(text: str) -> set[str]:
    names = set()
    for ch in text:
        if ch.isalpha():
            names.add(unicodedata.name(ch, "?").split(" ")[0])
    return names


def test_splits_are_disjoint_and_cover_every_demo_language(tmp_path):
    counts = {}
    texts = {}
    for split in ("train", "heldout"):
        path = tmp_path / f"{split}.jsonl"
        counts[split] = write_builtin_corpus(path, split=split)
        records = [json.loads(line) for line in path.read_text("utf-8").splitlines()]
        assert len(records) == counts[split]
        assert all(set(r) == {"text", "source_lang", "source"} for r in records)
        assert {r["source_lang"] for r in records} == set(DEMO_LANGUAGES)
        texts[split] = {r["text"] for r in records}
    assert not texts["train"] & texts["heldout"]
    assert counts["train"] >= 3 * counts["heldout"] and counts["train"] >= 90


def test_documents_are_paragraphs_in_the_promised_scripts():
    docs = builtin_documents()
    assert 8 <= len(DEMO_LANGUAGES) <= 12
    scripts = set()
    for doc in docs:
        assert len(split_words(doc["text"])) >= MIN_WORDS
        assert doc["source"].startswith("gflanguages:")
        scripts |= _scripts(doc["text"])
    for script in (
        "LATIN",
        "CYRILLIC",
        "ARABIC",
        "HEBREW",
        "DEVANAGARI",
        "CJK",
        "HIRAGANA",
        "HANGUL",
    ):
        assert script in scripts, script
    # No paragraph is a fragment of another one (the package repeats text at several sizes).
    folded = [d["text"].casefold() for d in docs]
    assert not any(a != b and a in b for a in folded for b in folded)


def test_language_subset_and_bad_arguments(tmp_path):
    assert {d["source_lang"] for d in builtin_documents(["ru", "hi"])} == {"ru", "hi"}
    assert write_builtin_corpus(tmp_path / "de.jsonl", ["de"], "train") >= 1
    with pytest.raises(ValueError, match="split"):
        builtin_documents(split="test")
    with pytest.raises(ValueError, match="xx"):
        builtin_documents(["xx"])
