"""Train the multilingual SentencePiece BPE tokenizer on curated JSONL.

    from megatron_ext.tokenizer.training import TokenizerTrainingConfig, train_tokenizer
    result = train_tokenizer(["data/curated/*.jsonl.zst"], "out/tokenizer",
                             TokenizerTrainingConfig(vocab_size=4000))
    result.model_path   # out/tokenizer/tokenizer.model

The model: BPE with byte fallback (no unknown tokens), digits split one per token, identity
normalisation (text round-trips exactly), no dummy prefix, whitespace kept as is. Ids 0-3 are
``<unk>``, ``<s>`` (BOS), ``</s>`` (EOS, the end-of-document id) and ``<pad>``; ids 4.. are
``num_reserved_tokens`` control tokens ``<reserved_0>``...; then the 256 byte tokens and the
learned pieces. Training text is sampled per language with temperature (see ``sampling``).

``output_dir`` receives::

    tokenizer.model  tokenizer.vocab                                      SentencePiece
    tokenizer.json   tokenizer_config.json  special_tokens_map.json       Hugging Face (same ids)
    tokenizer_report.json  tokenizer_report.md                            what was sampled, and
                                                                          per-language compression
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_ext.config.errors import ProblemCollector
from megatron_ext.config.loader import to_dict
from megatron_ext.data.jsonl_io import BadInputReport, expand_inputs
from megatron_ext.tokenizer.evaluation import compare_tokenizers, format_comparison
from megatron_ext.tokenizer.hf_export import export_hf_tokenizer
from megatron_ext.tokenizer.loading import SentencePieceTokenizer
from megatron_ext.tokenizer.sampling import (
    UNKNOWN_LANGUAGE,
    SampleStats,
    drop_characters,
    rare_characters,
    scan_corpus,
    temperature_targets,
    write_sample,
)

logger = logging.getLogger(__name__)

NUM_BYTE_TOKENS = 256
SPECIAL_PIECES = ("<unk>", "<s>", "</s>", "<pad>")


@dataclass(kw_only=True)
class TokenizerTrainingConfig:
    """How the tokenizer is trained; defaults are the recipe's 65,536 vocabulary."""

    vocab_size: int = 65536
    """Total ids, special, reserved and byte tokens included. Up to 65,536 fits uint16 datasets."""
    text_key: str = "text"
    """JSON key holding the document text."""
    lang_keys: list[str] = field(default_factory=lambda: ["lang", "source_lang"])
    """JSON keys of the language code, tried in order (curation writes the identified language as
    ``lang``; the built-in corpus labels its records ``source_lang``). A record with none of them
    counts as language 'unknown'."""
    temperature_alpha: float = 0.3
    """Sampling exponent: language shares ~ natural share ** alpha (1 keeps the natural mix)."""
    max_repeat: float = 4.0
    """A language's text is repeated at most this many times to reach its share."""
    max_training_bytes: int = 200_000_000
    """Budget for the training sample; SentencePiece holds it in memory (several times over)."""
    max_sentences: int = 10_000_000
    """SentencePiece's input_sentence_size: a second cap, on lines, sampled if exceeded."""
    max_sentence_bytes: int = 4096
    """Longer lines are cut (at a space when possible) before training."""
    character_coverage: float = 0.9995
    """Share of characters covered by pieces; the rarest fall back to byte tokens."""
    num_reserved_tokens: int = 8
    """Control tokens <reserved_0>.. kept free for later use (e.g. chat markers)."""
    heldout_fraction: float = 0.02
    """Share of documents (chosen by content hash) held out of training for the report."""
    heldout_bytes_per_language: int = 200_000
    """At most this many held-out bytes per language are kept for the report."""
    compare_unbalanced: bool = True
    """Also train a tokenizer on the natural language mix and put it in the report."""
    num_threads: int = 2
    """SentencePiece training threads."""
    seed: int = 1234
    """Seed for sampling and SentencePiece's shuffling."""
    strict: bool = False
    """Stop at the first bad input record instead of counting and skipping it."""
    max_doc_bytes: int | None = None
    """Records with longer raw lines are skipped as too_large (None: no limit)."""
    model_max_length: int = 8192
    """model_max_length written into tokenizer_config.json."""


@dataclass
class TrainedTokenizer:
    """Where the trained tokenizer and its report were written."""

    output_dir: str
    model_path: str
    vocab_path: str
    hf_files: list[str]
    report: dict[str, Any] = field(default_factory=dict)


def validate_config(cfg: TokenizerTrainingConfig) -> None:
    """Raise one ConfigError listing every invalid field."""
    p = ProblemCollector()
    minimum = len(SPECIAL_PIECES) + cfg.num_reserved_tokens + NUM_BYTE_TOKENS + 1
    p.check(
        cfg.vocab_size >= minimum,
        "vocab_size",
        cfg.vocab_size,
        f"must exceed the {minimum - 1} special, reserved and byte tokens",
        f"use vocab_size >= {minimum}",
    )
    p.check(
        0.0 < cfg.temperature_alpha <= 1.0,
        "temperature_alpha",
        cfg.temperature_alpha,
        "must be in (0, 1]",
        "use e.g. 0.3 (1.0 = natural language mix)",
    )
    p.check(
        cfg.max_repeat >= 1.0,
        "max_repeat",
        cfg.max_repeat,
        "must be >= 1",
        "use 1.0 to never repeat text",
    )
    p.check(
        cfg.max_training_bytes > 0,
        "max_training_bytes",
        cfg.max_training_bytes,
        "must be positive",
        "use e.g. 200000000",
    )
    p.check(
        cfg.max_sentences > 0,
        "max_sentences",
        cfg.max_sentences,
        "must be positive",
        "use e.g. 10000000",
    )
    p.check(
        64 <= cfg.max_sentence_bytes <= 65536,
        "max_sentence_bytes",
        cfg.max_sentence_bytes,
        "must be in [64, 65536]",
        "use 4096",
    )
    p.check(
        0.98 <= cfg.character_coverage <= 1.0,
        "character_coverage",
        cfg.character_coverage,
        "must be in [0.98, 1] (SentencePiece's range)",
        "use 0.9995 for multilingual text",
    )
    p.check(
        cfg.num_reserved_tokens >= 0,
        "num_reserved_tokens",
        cfg.num_reserved_tokens,
        "must be >= 0",
        "use e.g. 8",
    )
    p.check(
        0.0 <= cfg.heldout_fraction < 0.5,
        "heldout_fraction",
        cfg.heldout_fraction,
        "must be in [0, 0.5)",
        "use e.g. 0.02, or 0 to hold nothing out",
    )
    p.check(cfg.num_threads >= 1, "num_threads", cfg.num_threads, "must be >= 1", "use 1 or more")
    p.raise_if_any()


def train_tokenizer(
    inputs: list[str] | str,
    output_dir: str | os.PathLike,
    config: TokenizerTrainingConfig | None = None,
    heldout_inputs: list[str] | str | None = None,
) -> TrainedTokenizer:
    """Train on JSONL ``inputs`` (files or globs; plain, .gz, .zst) and write into ``output_dir``.

    ``heldout_inputs`` (JSONL with the same keys) replaces the hash-chosen held-out share for the
    report; then every input document is available for training. Raises ``ConfigError`` for a bad
    config, ``ValueError`` when no usable text is found or SentencePiece refuses the vocabulary
    size, ``BadInputError`` on bad input with ``strict``.
    """
    cfg = config or TokenizerTrainingConfig()
    validate_config(cfg)
    paths = expand_inputs([inputs] if isinstance(inputs, str) else inputs)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = BadInputReport()
    heldout_fraction = 0.0 if heldout_inputs else cfg.heldout_fraction
    scan = scan_corpus(
        paths,
        text_key=cfg.text_key,
        lang_keys=cfg.lang_keys,
        heldout_fraction=heldout_fraction,
        heldout_bytes_per_language=cfg.heldout_bytes_per_language,
        report=report,
        strict=cfg.strict,
        max_doc_bytes=cfg.max_doc_bytes,
    )
    if scan.total_train_bytes == 0:
        raise ValueError(f"no usable training text in {paths} ({report.summary()})")
    if set(scan.train_bytes) == {UNKNOWN_LANGUAGE}:
        logger.warning(
            "no training record has a language (keys %s): every record counts as '%s' and the "
            "languages are not balanced; set lang_keys to the records' language field",
            cfg.lang_keys,
            UNKNOWN_LANGUAGE,
        )
    heldout = scan.heldout
    if heldout_inputs:
        extra = scan_corpus(
            expand_inputs([heldout_inputs] if isinstance(heldout_inputs, str) else heldout_inputs),
            text_key=cfg.text_key,
            lang_keys=cfg.lang_keys,
            heldout_fraction=1.0,
            heldout_bytes_per_language=cfg.heldout_bytes_per_language,
            report=report,
            strict=cfg.strict,
            max_doc_bytes=cfg.max_doc_bytes,
        )
        heldout = extra.heldout

    work = Path(tempfile.mkdtemp(prefix=".train_tokenizer-", dir=out))
    try:
        balanced, sample = _train_one(
            paths,
            work / "balanced",
            scan.train_bytes,
            cfg.temperature_alpha,
            cfg.max_repeat,
            cfg,
            heldout_fraction,
        )
        candidates = {"balanced": balanced}
        samples = {"balanced": sample}
        if cfg.compare_unbalanced:
            natural, natural_sample = _train_one(
                paths, work / "natural", scan.train_bytes, 1.0, 1.0, cfg, heldout_fraction
            )
            candidates["natural"] = natural
            samples["natural"] = natural_sample
        for suffix in (".model", ".vocab"):
            os.replace(work / "balanced" / f"tokenizer{suffix}", out / f"tokenizer{suffix}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    hf_files = export_hf_tokenizer(out / "tokenizer.model", out, cfg.model_max_length)
    tokenizer = SentencePieceTokenizer(out / "tokenizer.model")
    comparison = compare_tokenizers(
        heldout,
        {
            "balanced": tokenizer,
            **{name: tok for name, tok in candidates.items() if name != "balanced"},
        },
    )
    result_report = {
        "config": to_dict(cfg),
        "inputs": paths,
        "vocab_size": tokenizer.vocab_size,
        "special_ids": {
            "unk": tokenizer.unk,
            "bos": tokenizer.bos,
            "eod": tokenizer.eod,
            "pad": tokenizer.pad,
        },
        "bad_input": report.to_dict(),
        "available_bytes": dict(sorted(scan.train_bytes.items())),
        "available_docs": dict(sorted(scan.train_docs.items())),
        "sample_bytes": {
            name: dict(sorted(s.bytes_per_language.items())) for name, s in samples.items()
        },
        "dropped_rare_chars": {name: s.num_dropped_chars for name, s in samples.items()},
        "heldout": comparison,
    }
    _write_report(out, result_report)
    logger.info("tokenizer written to %s (vocab %d)", out, tokenizer.vocab_size)
    return TrainedTokenizer(
        str(out),
        str(out / "tokenizer.model"),
        str(out / "tokenizer.vocab"),
        hf_files,
        result_report,
    )


def _train_one(
    paths: list[str],
    workdir: Path,
    available: dict[str, int],
    alpha: float,
    max_repeat: float,
    cfg: TokenizerTrainingConfig,
    heldout_fraction: float,
) -> tuple[SentencePieceTokenizer, SampleStats]:
    workdir.mkdir(parents=True)
    targets = temperature_targets(available, alpha, cfg.max_training_bytes, max_repeat)
    rates = {lang: targets[lang] / available[lang] for lang in targets if available[lang]}
    sample_path = workdir / "sample.txt"
    stats = write_sample(
        paths,
        str(sample_path),
        rates=rates,
        text_key=cfg.text_key,
        lang_keys=cfg.lang_keys,
        heldout_fraction=heldout_fraction,
        max_sentence_bytes=cfg.max_sentence_bytes,
        seed=cfg.seed,
        max_doc_bytes=cfg.max_doc_bytes,
    )
    # At most half of the learnable ids go to single characters; the rest to merges.
    learnable = cfg.vocab_size - len(SPECIAL_PIECES) - cfg.num_reserved_tokens - NUM_BYTE_TOKENS
    rare = rare_characters(stats.char_counts, cfg.character_coverage, learnable // 2)
    if rare:
        logger.info(
            "%d rare characters left to byte fallback to fit vocab_size %d",
            len(rare),
            cfg.vocab_size,
        )
        drop_characters(str(sample_path), rare)
    stats.num_dropped_chars = len(rare)
    _run_sentencepiece(str(sample_path), str(workdir / "tokenizer"), cfg)
    sample_path.unlink()
    return SentencePieceTokenizer(workdir / "tokenizer.model"), stats


def _run_sentencepiece(sample_path: str, model_prefix: str, cfg: TokenizerTrainingConfig) -> None:
    import sentencepiece

    sentencepiece.set_random_generator_seed(cfg.seed)
    try:
        sentencepiece.SentencePieceTrainer.train(
            input=sample_path,
            model_prefix=model_prefix,
            model_type="bpe",
            vocab_size=cfg.vocab_size,
            byte_fallback=True,
            split_digits=True,
            character_coverage=cfg.character_coverage,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=3,
            unk_piece=SPECIAL_PIECES[0],
            bos_piece=SPECIAL_PIECES[1],
            eos_piece=SPECIAL_PIECES[2],
            pad_piece=SPECIAL_PIECES[3],
            control_symbols=[f"<reserved_{i}>" for i in range(cfg.num_reserved_tokens)],
            input_sentence_size=cfg.max_sentences,
            shuffle_input_sentence=True,
            max_sentence_length=cfg.max_sentence_bytes + 16,
            num_threads=cfg.num_threads,
            minloglevel=2,
        )
    except RuntimeError as exc:
        raise ValueError(
            f"SentencePiece could not train a {cfg.vocab_size}-token vocabulary: {exc}. "
            "Give it more (or more varied) text, or lower vocab_size."
        ) from exc


def _write_report(out: Path, report: dict[str, Any]) -> None:
    tmp = out / "tokenizer_report.json.tmp"
    tmp.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, out / "tokenizer_report.json")
    lines = [
        "# Tokenizer report",
        "",
        f"vocab_size: {report['vocab_size']}, temperature alpha: "
        f"{report['config']['temperature_alpha']}, inputs: {len(report['inputs'])} file(s)",
        f"bad input skipped: {report['bad_input']['total']}",
        "",
        "## Training sample (bytes per language)",
        "",
        "| language | available | " + " | ".join(report["sample_bytes"]) + " |",
        "|---|---|" + "---|" * len(report["sample_bytes"]),
    ]
    for lang, available in report["available_bytes"].items():
        cells = [str(s.get(lang, 0)) for s in report["sample_bytes"].values()]
        lines.append(f"| {lang} | {available} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Held-out compression (lower is better)",
        "",
        format_comparison(report["heldout"]),
    ]
    tmp = out / "tokenizer_report.md.tmp"
    tmp.write_text("\n".join(lines), encoding="utf-8")
    os.replace(tmp, out / "tokenizer_report.md")
