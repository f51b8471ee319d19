"""A small real multilingual corpus built offline from the ``gflanguages`` package.

``gflanguages`` (PyPI, Apache-2.0, Google Fonts) stores for each language sample texts taken from
the Universal Declaration of Human Rights (UDHR): preamble paragraphs and articles, a few hundred
to a few thousand characters per language. This module splits them into paragraphs, drops the
fragments that are contained in a longer paragraph (the package repeats text at several type
sizes) and paragraphs under ``MIN_WORDS`` words, and writes one JSONL document per paragraph:

    {"text": ..., "source_lang": "ru", "source": "gflanguages:ru_Cyrl:specimen_16"}

The ``train`` and ``heldout`` splits are disjoint: every ``HELDOUT_EVERY``-th paragraph of a
language (in package order) is held out. Provenance and licence: docs/curation.md.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence
from pathlib import Path

from megatron_ext.curation.text import split_words

# Latin (en, fr, es), Cyrillic (ru, uk), Arabic script, right to left (ar, fa), Hebrew (he),
# Devanagari (hi), CJK: Han (zh), Kana + Han (ja), Hangul (ko).
DEMO_LANGUAGES: tuple[str, ...] = (
    "en",
    "fr",
    "es",
    "ru",
    "uk",
    "ar",
    "fa",
    "he",
    "hi",
    "zh",
    "ja",
    "ko",
)

# gflanguages entries per language code; other codes use every entry of that language.
_ENTRIES: dict[str, tuple[str, ...]] = {
    "en": ("en_Latn",),
    "fr": ("fr_Latn",),
    "es": ("es_Latn",),
    "ru": ("ru_Cyrl",),
    "uk": ("uk_Cyrl",),
    "ar": ("ar_Arab",),
    "fa": ("fa_Arab",),
    "he": ("he_Hebr",),
    "hi": ("hi_Deva",),
    "zh": ("zh_Hans", "zh_Hant"),
    "ja": ("ja_Jpan",),
    "ko": ("ko_Kore",),
}
MIN_WORDS = 8
HELDOUT_EVERY = 4
SPLITS = ("train", "heldout")


@functools.cache
def _languages() -> dict:
    import gflanguages

    return gflanguages.LoadLanguages()


def _entries_for(code: str) -> tuple[str, ...]:
    if code in _ENTRIES:
        return _ENTRIES[code]
    found = tuple(sorted(k for k, v in _languages().items() if v.language == code))
    if not found:
        raise ValueError(f"gflanguages has no language with code {code!r}")
    return found


def language_paragraphs(code: str) -> list[tuple[str, str]]:
    """(source, paragraph) pairs for one language code, de-duplicated, in package order."""
    candidates: list[tuple[str, str]] = []
    for entry_id in _entries_for(code):
        sample = _languages()[entry_id].sample_text
        for field_descriptor, value in sample.ListFields():
            for paragraph in str(value).split("\n"):
                paragraph = " ".join(paragraph.split())
                if len(split_words(paragraph)) >= MIN_WORDS:
                    candidates.append(
                        (f"gflanguages:{entry_id}:{field_descriptor.name}", paragraph)
                    )
    folded = [p.casefold() for _, p in candidates]
    result: list[tuple[str, str]] = []
    kept: set[str] = set()
    for i, (source, paragraph) in enumerate(candidates):
        key = folded[i]
        if key in kept:
            continue
        if any(key != other and key in other for other in folded):
            continue  # a fragment of a longer paragraph
        kept.add(key)
        result.append((source, paragraph))
    return result


def builtin_documents(
    languages: Sequence[str] | None = None, split: str = "train"
) -> list[dict[str, str]]:
    """The corpus as records (``text``, ``source_lang``, ``source``), languages in given order."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    docs = []
    for code in languages if languages is not None else DEMO_LANGUAGES:
        for index, (source, paragraph) in enumerate(language_paragraphs(code)):
            held = index % HELDOUT_EVERY == HELDOUT_EVERY - 1
            if held == (split == "heldout"):
                docs.append({"text": paragraph, "source_lang": code, "source": source})
    return docs


def write_builtin_corpus(
    path: str | Path, languages: Sequence[str] | None = None, split: str = "train"
) -> int:
    """Write the built-in corpus as JSONL at ``path``; returns the number of documents."""
    docs = builtin_documents(languages, split)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="\n") as out:
        for doc in docs:
            out.write(json.dumps(doc, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return len(docs)
