"""Stage 5: perplexity scoring and filtering with per-language n-gram models (CCNet style).

Training (``train_perplexity_models``, CLI ``tools/train_perplexity_model.py``) writes, per
language, ``<lang>.arpa`` (modified Kneser-Ney, ``megatron_ext.curation.kneser_ney``) and records
in ``manifest.json`` the perplexity percentiles 0..100 of held-out reference documents.

Scoring uses the KenLM query library (``kenlm`` module, ufal-kenlm wheel). A document's
perplexity is 10^(-sum log10 p / N) over its lines, each line scored as ``<s> words </s>``, N the
number of words plus one ``</s>`` per line. Words are ``normalized_words`` (casefolded, no
punctuation, digits as 0; one word per CJK character), the same on both sides.

Filtering compares a document to its language's reference percentiles: the CCNet buckets are head
(below ``head_percentile``), middle, and tail (above ``tail_percentile``); ``keep_buckets`` picks
the ones to keep, and anything above ``max_factor`` x the ``max_percentile`` perplexity is
removed as ``perplexity_too_high`` (random characters, scrambled words, another language).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from collections import defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from megatron_ext.curation.config import PerplexityConfig
from megatron_ext.curation.kneser_ney import train_kneser_ney, write_arpa
from megatron_ext.curation.text import normalized_words
from megatron_ext.data.jsonl_io import BadInputError, BadInputReport, iter_jsonl

MANIFEST_NAME = "manifest.json"
TOKENIZATIONS = {"word": "normalized_words-v1", "char": "normalized_chars-v1"}
WORD_BOUNDARY = "\u2581"  # "▁", as in SentencePiece


def lm_sentences(text: str, unit: str = "word") -> list[list[str]]:
    """The token sequences (one per non-empty line) an n-gram model sees for a document.

    ``word``: normalised words. ``char``: their characters, with ``▁`` between words; character
    models have no out-of-vocabulary problem, so they also work from small reference corpora.
    """
    if unit not in TOKENIZATIONS:
        raise ValueError(f"unit must be one of {sorted(TOKENIZATIONS)}, got {unit!r}")
    sentences = []
    for line in text.split("\n"):
        words = normalized_words(line)
        if not words:
            continue
        if unit == "char":
            sentences.append(list(WORD_BOUNDARY.join(words)))
        else:
            sentences.append(words)
    return sentences


def load_kenlm(path: str | os.PathLike) -> Any:
    """Load an ARPA (or KenLM binary) file with the KenLM query library, quietly."""
    import kenlm

    config = kenlm.Config()
    config.show_progress = False
    with _stderr_silenced():
        return kenlm.Model(str(path), config)


@contextlib.contextmanager
def _stderr_silenced() -> Iterator[None]:
    # KenLM's C++ loader prints a hint about binary files to file descriptor 2 on every ARPA load.
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def document_perplexity(model: Any, text: str, unit: str = "word") -> float | None:
    """Perplexity of a document under a KenLM model; None when it has no words."""
    total = 0.0
    count = 0
    for words in lm_sentences(text, unit):
        total += model.score(" ".join(words), bos=True, eos=True)
        count += len(words) + 1
    if count == 0:
        return None
    return 10.0 ** (-total / count)


def train_perplexity_models(
    train_docs: Iterable[tuple[str, str]],
    output_dir: str | os.PathLike,
    *,
    order: int = 3,
    unit: str = "word",
    heldout_docs: Iterable[tuple[str, str]] | None = None,
    heldout_every: int = 10,
    languages: Iterable[str] | None = None,
    min_heldout_docs: int = 1,
) -> dict[str, Any]:
    """Train one model per language from ``(lang, text)`` pairs; returns the manifest.

    Without ``heldout_docs``, every ``heldout_every``-th document of a language (in input order)
    is held out of training and used for the percentiles. Languages with no held-out document
    are trained on everything and their percentiles come from the training documents (noted as
    ``percentiles_from: train`` in the manifest).
    """
    wanted = set(languages) if languages is not None else None
    train: dict[str, list[str]] = defaultdict(list)
    held: dict[str, list[str]] = defaultdict(list)
    seen: dict[str, int] = defaultdict(int)
    for lang, text in train_docs:
        if wanted is not None and lang not in wanted:
            continue
        seen[lang] += 1
        if heldout_docs is None and heldout_every > 0 and seen[lang] % heldout_every == 0:
            held[lang].append(text)
        else:
            train[lang].append(text)
    for lang, text in heldout_docs or ():
        if wanted is None or lang in wanted:
            held[lang].append(text)
    if not train:
        raise ValueError("no training documents for any requested language")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    entries: dict[str, Any] = {}
    for lang in sorted(train):
        sentences = [s for text in train[lang] for s in lm_sentences(text, unit)]
        if not sentences:
            continue
        model = train_kneser_ney(sentences, order)
        arpa_name = f"{lang}.arpa"
        write_arpa(model, output_dir / arpa_name)
        scorer = load_kenlm(output_dir / arpa_name)
        source = "heldout" if len(held[lang]) >= min_heldout_docs else "train"
        docs = held[lang] if source == "heldout" else train[lang]
        values = [p for d in docs if (p := document_perplexity(scorer, d, unit)) is not None]
        if not values and source == "heldout":
            # Held-out documents without a scorable word (digits, punctuation): use the training
            # documents, as for a language with too few held-out documents.
            source = "train"
            values = [
                p for d in train[lang] if (p := document_perplexity(scorer, d, unit)) is not None
            ]
        entries[lang] = {
            "arpa": arpa_name,
            "order": order,
            "train_docs": len(train[lang]),
            "train_tokens": sum(len(s) for s in sentences),
            "vocab_size": len(model.log10_probs[0]),
            "discounts": [list(d) for d in model.discounts],
            "discount_fallback": model.discount_fallback,
            "percentiles_from": source,
            "percentile_docs": len(values),
            "percentiles": [float(v) for v in np.percentile(values, np.arange(101))],
        }
    manifest = {"unit": unit, "tokenization": TOKENIZATIONS[unit], "languages": entries}
    tmp = output_dir / (MANIFEST_NAME + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True), encoding="utf-8")
    os.replace(tmp, output_dir / MANIFEST_NAME)
    return manifest


def read_manifest(model_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(model_dir) / MANIFEST_NAME
    if not path.is_file():
        raise ValueError(
            f"no perplexity model manifest at {path}; train models with "
            "tools/train_perplexity_model.py or set perplexity.reference: builtin"
        )
    manifest = json.loads(path.read_text(encoding="utf-8"))
    unit = manifest.get("unit")
    if unit not in TOKENIZATIONS or manifest.get("tokenization") != TOKENIZATIONS[unit]:
        raise ValueError(
            f"{path}: models use tokenization {manifest.get('tokenization')!r}, this version "
            f"scores with one of {sorted(TOKENIZATIONS.values())}; retrain them"
        )
    return manifest


def percentile_value(percentiles: list[float], q: float) -> float:
    """Interpolate the perplexity at percentile q from the 0..100 table."""
    return float(np.interp(q, np.arange(len(percentiles)), percentiles))


class PerplexityFilter:
    """Scores documents with their language's model and applies the bucket/garbage rules."""

    def __init__(self, config: PerplexityConfig, model_dir: str | os.PathLike):
        self.config = config
        self.model_dir = Path(model_dir)
        self.manifest = read_manifest(model_dir)
        self.unit = self.manifest["unit"]
        self._models: dict[str, Any] = {}
        self._cutoffs: dict[str, tuple[float, float, float]] = {}
        for lang, entry in self.manifest["languages"].items():
            table = entry["percentiles"]
            self._cutoffs[lang] = (
                percentile_value(table, config.head_percentile),
                percentile_value(table, config.tail_percentile),
                config.max_factor * percentile_value(table, config.max_percentile),
            )

    @property
    def languages(self) -> list[str]:
        return sorted(self._cutoffs)

    def cutoffs(self, lang: str) -> tuple[float, float, float] | None:
        """(head upper bound, tail lower bound, removal threshold) for a language."""
        return self._cutoffs.get(lang)

    def score(self, text: str, lang: str) -> float | None:
        if lang not in self._cutoffs:
            return None
        model = self._models.get(lang)
        if model is None:
            entry = self.manifest["languages"][lang]
            model = self._models[lang] = load_kenlm(self.model_dir / entry["arpa"])
        value = document_perplexity(model, text, self.unit)
        if value is None or not math.isfinite(value):
            return None
        # Rounded so the written value is exactly the one the thresholds saw.
        return round(value, 3)

    def bucket(self, perplexity: float, lang: str) -> str:
        head, tail, _ = self._cutoffs[lang]
        if perplexity < head:
            return "head"
        return "middle" if perplexity <= tail else "tail"

    def judge(self, text: str, lang: str) -> tuple[float | None, str | None, str | None]:
        """(perplexity, bucket, reject reason or None)."""
        if lang not in self._cutoffs:
            reason = "no_perplexity_model" if self.config.missing_model == "drop" else None
            return None, None, reason
        perplexity = self.score(text, lang)
        if perplexity is None:
            return None, None, "no_words_to_score"
        bucket = self.bucket(perplexity, lang)
        if perplexity > self._cutoffs[lang][2]:
            return perplexity, bucket, "perplexity_too_high"
        if bucket not in self.config.keep_buckets:
            return perplexity, bucket, f"perplexity_bucket_{bucket}"
        return perplexity, bucket, None


def iter_language_documents(
    paths: Iterable[str],
    text_key: str = "text",
    lang_key: str = "lang",
    report: BadInputReport | None = None,
    strict: bool = False,
) -> Iterator[tuple[str, str]]:
    """(language, text) pairs from JSONL files; records without a string ``lang_key`` are
    counted in ``report`` as ``missing_lang_key`` (or raise with ``strict``)."""
    report = report if report is not None else BadInputReport()
    for rec in iter_jsonl(paths, text_key=text_key, report=report, strict=strict):
        lang = rec.record.get(lang_key)
        if not isinstance(lang, str) or not lang:
            if strict:
                raise BadInputError(rec.path, rec.line_number, "missing_lang_key", lang_key)
            report.add("missing_lang_key", rec.path, rec.line_number)
            continue
        yield lang, rec.text
