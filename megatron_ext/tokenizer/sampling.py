"""Language-balanced sampling of tokenizer training text, within a memory budget.

SentencePiece holds every training sentence in memory, so the corpus is sampled down to a byte
budget before training. With natural shares ``q_l = bytes_l / total`` the target share of
language ``l`` is ``p_l ~ q_l ** alpha`` (``alpha = 1`` keeps the natural mix, ``alpha -> 0``
makes it uniform); small languages get a fairer share of the vocabulary that way.

The sample holds ``min(budget, total)`` bytes. A language's target is ``lambda * p_l`` capped
at ``max_repeat`` times what it has; the budget a capped language cannot use is shared out over
the others (water filling). A document of a language with rate ``r = target / available`` is
written ``floor(r)`` times plus once more with probability ``r - floor(r)``, from a seeded
generator, so the sample is the same on every run. Repeating a small language's text raises the
counts its pieces get in BPE, which is the point of balancing.

Two passes over the input: ``scan_corpus`` counts bytes per language (and keeps the held-out
documents used by the report), ``write_sample`` streams the chosen sentences to a text file,
one sentence per line, which SentencePiece then reads.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from megatron_ext.data.jsonl_io import BadInputError, BadInputReport, iter_jsonl

UNKNOWN_LANGUAGE = "unknown"


@dataclass
class CorpusScan:
    """What the first pass learns: bytes and documents per language, and held-out text."""

    train_bytes: dict[str, int] = field(default_factory=dict)
    train_docs: dict[str, int] = field(default_factory=dict)
    heldout: dict[str, list[str]] = field(default_factory=dict)
    heldout_bytes: dict[str, int] = field(default_factory=dict)

    @property
    def total_train_bytes(self) -> int:
        return sum(self.train_bytes.values())


@dataclass
class SampleStats:
    """What the second pass wrote: bytes and sentences per language."""

    bytes_per_language: dict[str, int] = field(default_factory=dict)
    sentences_per_language: dict[str, int] = field(default_factory=dict)
    char_counts: Counter = field(default_factory=Counter)
    num_dropped_chars: int = 0
    """Distinct rare characters taken out to fit a small vocabulary (set by the trainer)."""

    @property
    def num_sentences(self) -> int:
        return sum(self.sentences_per_language.values())


def language_of(record: dict, lang_keys: Sequence[str]) -> str:
    """The value of the first of ``lang_keys`` the record holds as a non-empty string."""
    for key in lang_keys:
        value = record.get(key)
        if isinstance(value, str) and value.strip():
            return value
    return UNKNOWN_LANGUAGE


def encoded_size(text: str) -> int | None:
    """UTF-8 size of ``text``, or None when it holds a lone surrogate."""
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError:
        return None


def is_heldout(text: str, fraction: float) -> bool:
    """A stable, content-based choice: the same document is held out on every run."""
    if fraction <= 0.0:
        return False
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64 < fraction


def scan_corpus(
    paths: Sequence[str],
    *,
    text_key: str,
    lang_keys: Sequence[str],
    heldout_fraction: float,
    heldout_bytes_per_language: int,
    report: BadInputReport,
    strict: bool = False,
    max_doc_bytes: int | None = None,
) -> CorpusScan:
    """Count training bytes per language; keep held-out documents up to a per-language cap."""
    scan = CorpusScan()
    for rec in iter_jsonl(paths, text_key, report, strict, max_doc_bytes):
        size = encoded_size(rec.text)
        if size is None:
            # JSON escapes can spell a lone surrogate ("\ud800"), which is not encodable text.
            if strict:
                raise BadInputError(rec.path, rec.line_number, "lone_surrogate")
            report.add("lone_surrogate", rec.path, rec.line_number)
            continue
        lang = language_of(rec.record, lang_keys)
        if is_heldout(rec.text, heldout_fraction):
            if scan.heldout_bytes.get(lang, 0) < heldout_bytes_per_language:
                scan.heldout.setdefault(lang, []).append(rec.text)
                scan.heldout_bytes[lang] = scan.heldout_bytes.get(lang, 0) + size
            continue
        scan.train_bytes[lang] = scan.train_bytes.get(lang, 0) + size
        scan.train_docs[lang] = scan.train_docs.get(lang, 0) + 1
    return scan


def temperature_targets(
    available: dict[str, int], alpha: float, budget: int, max_repeat: float
) -> dict[str, float]:
    """Target bytes per language: shares ``~ q ** alpha``, capped at ``max_repeat * available``."""
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"temperature alpha must be in (0, 1], got {alpha}")
    if max_repeat < 1.0:
        raise ValueError(f"max_repeat must be >= 1, got {max_repeat}")
    langs = [lang for lang, n in available.items() if n > 0]
    total = sum(available[lang] for lang in langs)
    goal = float(min(budget, total))
    if not langs or goal <= 0:
        return {lang: 0.0 for lang in available}
    weight = {lang: (available[lang] / total) ** alpha for lang in langs}
    cap = {lang: max_repeat * available[lang] for lang in langs}
    capped: set[str] = set()
    while True:
        free = [lang for lang in langs if lang not in capped]
        if not free:
            break
        remaining = goal - sum(cap[lang] for lang in capped)
        scale = remaining / sum(weight[lang] for lang in free)
        # The tolerance keeps alpha = 1 with max_repeat = 1 (targets == caps) from rounding up.
        newly = {lang for lang in free if scale * weight[lang] > cap[lang] * (1 + 1e-9)}
        if not newly:
            break
        capped |= newly
    targets = {
        lang: cap[lang] if lang in capped else min(scale * weight[lang], cap[lang])
        for lang in langs
    }
    return {lang: targets.get(lang, 0.0) for lang in available}


def split_sentences(text: str, max_bytes: int) -> Iterator[str]:
    """Lines of ``text`` (blank ones dropped), long lines cut near ``max_bytes`` at a space."""
    for line in text.split("\n"):
        line = line.rstrip("\r")
        while len(line.encode("utf-8")) > max_bytes:
            head = line.encode("utf-8")[:max_bytes].decode("utf-8", "ignore")
            cut = head.rfind(" ")
            cut = cut if cut > len(head) // 2 else len(head)
            piece, line = line[:cut], line[cut:]
            if piece.strip():
                yield piece
        if line.strip():
            yield line


def write_sample(
    paths: Sequence[str],
    out_path: str,
    *,
    rates: dict[str, float],
    text_key: str,
    lang_keys: Sequence[str],
    heldout_fraction: float,
    max_sentence_bytes: int,
    seed: int,
    max_doc_bytes: int | None = None,
) -> SampleStats:
    """Stream the sampled sentences to ``out_path``; ``rates`` are target / available per language.

    Bad records were already counted by ``scan_corpus``; this pass skips them silently.
    """
    rng = random.Random(seed)
    stats = SampleStats()
    with open(out_path, "w", encoding="utf-8", newline="\n") as out:
        for rec in iter_jsonl(paths, text_key, BadInputReport(), False, max_doc_bytes):
            if encoded_size(rec.text) is None or is_heldout(rec.text, heldout_fraction):
                continue
            lang = language_of(rec.record, lang_keys)
            rate = rates.get(lang, 0.0)
            copies = math.floor(rate) + (1 if rng.random() < rate - math.floor(rate) else 0)
            if copies == 0:
                continue
            sentences = list(split_sentences(rec.text, max_sentence_bytes))
            for _ in range(copies):
                for sentence in sentences:
                    out.write(sentence)
                    out.write("\n")
            for sentence in sentences:
                for char, count in Counter(sentence).items():
                    stats.char_counts[char] += copies * count
            written = copies * sum(len(s.encode("utf-8")) + 1 for s in sentences)
            stats.bytes_per_language[lang] = stats.bytes_per_language.get(lang, 0) + written
            stats.sentences_per_language[lang] = stats.sentences_per_language.get(
                lang, 0
            ) + copies * len(sentences)
    return stats


def rare_characters(char_counts: Counter, coverage: float, max_chars: int) -> set[str]:
    """Characters to keep out of the sample so that ``coverage`` needs at most ``max_chars``.

    SentencePiece keeps the most frequent characters until their share of all occurrences
    reaches ``character_coverage`` (which it requires to be >= 0.98), and fails when they do not
    fit the vocabulary. With a small vocabulary and many scripts (CJK alone has thousands of
    characters) they do not: the rarest are then taken out of the sample (the empty set when
    nothing needs to go). Text holding them is still encoded, as byte tokens.
    """
    ranked = [char for char, _ in char_counts.most_common()]
    if len(ranked) <= max_chars:
        return set()
    total = sum(char_counts.values())
    covered = sum(char_counts[char] for char in ranked[:max_chars])
    if covered / total >= coverage:
        return set()
    return set(ranked[max_chars:])


def drop_characters(sample_path: str, rare: set[str]) -> None:
    """Rewrite the sample with each rare character as a sentence break (no merge spans it)."""
    table = {ord(char): "\n" for char in rare}
    tmp_path = sample_path + ".tmp"
    with (
        open(sample_path, encoding="utf-8") as src,
        open(tmp_path, "w", encoding="utf-8", newline="\n") as dst,
    ):
        for line in src:
            for part in line.rstrip("\n").translate(table).split("\n"):
                if part.strip():
                    dst.write(part)
                    dst.write("\n")
    os.replace(tmp_path, sample_path)
