"""The curation pipeline: JSONL in, cleaned / filtered / deduplicated JSONL shards out.

    report = run_curation(config, ["data/*.jsonl.zst"], "curated/", workers=8)

How it runs, and why the output does not depend on ``workers``:

1. The driver reads the inputs line by line (sorted file list, file order, line order) and sends
   batches of raw lines to worker processes, with at most ``2 * workers`` batches in flight.
2. A worker parses each line, cleans the text, identifies its language, applies the quality and
   language rules, and for each survivor computes its exact-dedup key, MinHash band keys and
   perplexity. These depend on the document alone.
3. The driver takes results back in input order, appends survivors to a spill file and their keys
   to per-document arrays (the 16-byte exact key and a few small fields, about 30 bytes per
   document, in memory; 8 bytes per band on disk).
4. After the last batch it decides exact duplicates (first occurrence wins), near duplicates
   (first document of each LSH cluster wins) and perplexity removals, then copies the kept
   survivors from the spill file into the output shards, in input order.

Output records keep every input field, carry the cleaned text under the text key and add
``lang``, ``lang_score``, ``perplexity``, ``ppl_bucket`` and the document id.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from array import array
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from megatron_ext.config.loader import to_dict
from megatron_ext.curation.cleaning import TextCleaner
from megatron_ext.curation.config import (
    CurationConfig,
    near_dedup_threshold,
    validate_curation_config,
)
from megatron_ext.curation.dedup import (
    MinHasher,
    exact_duplicate_mask,
    exact_key,
    near_duplicate_mask_from_columns,
)
from megatron_ext.curation.langid import UNDETERMINED, LanguageIdentifier
from megatron_ext.curation.perplexity import PerplexityFilter, read_manifest
from megatron_ext.curation.quality import QualityFilter
from megatron_ext.curation.report import CurationReport, CurationStats, StageCounts
from megatron_ext.data.jsonl_io import (
    BadInputError,
    BadInputReport,
    ShardedJsonlWriter,
    dumps_record,
    expand_inputs,
    open_binary,
    parse_jsonl_line,
)

TMP_DIR_NAME = ".curation_tmp"


@dataclass
class Survivor:
    """A document that passed stages 1-2, with what the driver needs for stages 3-5."""

    index: int
    line: str
    exact_key: bytes
    band_keys: bytes
    """num_bands uint64 keys; empty when near dedup is off or the text has no words."""
    lang: str
    num_bytes: int
    perplexity_reason: str | None


@dataclass
class BatchResult:
    stats: CurationStats
    bad: list[tuple[int, str, str]]
    """(line number, reason, detail) of bad input lines."""
    survivors: list[Survivor]
    num_lines: int
    num_raw_bytes: int


class DocumentProcessor:
    """Runs the per-document work of every stage; one instance per process."""

    def __init__(self, config: CurationConfig, perplexity_model_dir: str | None):
        self.config = config
        self.cleaner = TextCleaner(config.cleaning)
        self.quality = QualityFilter(config.quality)
        self.langid = LanguageIdentifier(config.langid) if config.langid.enabled else None
        self.minhasher = MinHasher(config.near_dedup) if config.near_dedup.enabled else None
        self.perplexity = None
        if config.perplexity.enabled:
            assert perplexity_model_dir is not None
            self.perplexity = PerplexityFilter(config.perplexity, perplexity_model_dir)

    def process(self, first_index: int, items: list[tuple[int, bytes]]) -> BatchResult:
        io_cfg = self.config.io
        stats = CurationStats()
        bad: list[tuple[int, str, str]] = []
        survivors: list[Survivor] = []
        num_raw_bytes = 0
        for offset, (line_number, raw) in enumerate(items):
            num_raw_bytes += len(raw)
            record, text, detail = parse_jsonl_line(raw, io_cfg.text_key, io_cfg.max_doc_bytes)
            if record is None:
                bad.append((line_number, text, detail))
                stats.record("input", UNDETERMINED, len(raw), 0, f"bad_input:{text}")
                continue
            survivor = self._process_document(first_index + offset, record, text, stats)
            if survivor is not None:
                survivors.append(survivor)
        return BatchResult(stats, bad, survivors, len(items), num_raw_bytes)

    def _process_document(
        self, index: int, record: dict, text: str, stats: CurationStats
    ) -> Survivor | None:
        cfg = self.config
        size_in = len(text.encode("utf-8"))
        cleaned = self.cleaner.clean(text)
        if not cleaned.strip():
            stats.record("input", UNDETERMINED, size_in, size_in)
            stats.record("cleaning", UNDETERMINED, size_in, 0, "empty_after_cleaning")
            return None
        size = len(cleaned.encode("utf-8"))
        lang, score = UNDETERMINED, 0.0
        prediction = None
        if self.langid is not None:
            prediction = self.langid.predict(cleaned)
            lang, score = prediction.lang, prediction.score
        stats.record("input", lang, size_in, size_in)
        stats.record("cleaning", lang, size_in, size)
        reason = self.quality.check(cleaned)
        stats.record("quality", lang, size, size, reason)
        if reason is not None:
            return None
        reason = self.langid.reject_reason(prediction) if self.langid and prediction else None
        stats.record("langid", lang, size, size, reason)
        if reason is not None:
            return None
        perplexity = bucket = ppl_reason = None
        if self.perplexity is not None:
            perplexity, bucket, ppl_reason = self.perplexity.judge(cleaned, lang)
        out = dict(record)
        out[cfg.io.text_key] = cleaned
        out["lang"] = lang
        out["lang_score"] = score
        out["perplexity"] = perplexity
        out["ppl_bucket"] = bucket
        out[cfg.io.id_key] = hashlib.blake2b(cleaned.encode("utf-8"), digest_size=16).hexdigest()
        band_keys = b""
        if self.minhasher is not None:
            keys = self.minhasher.text_band_keys(cleaned)
            band_keys = keys.tobytes() if keys is not None else b""
        key = exact_key(cleaned, cfg.exact_dedup) if cfg.exact_dedup.enabled else b""
        return Survivor(index, dumps_record(out), key, band_keys, lang, size, ppl_reason)


# Per-worker-process state, set by the pool initializer (each process builds its own models).
_WORKER: DocumentProcessor | None = None


def _init_worker(config: CurationConfig, perplexity_model_dir: str | None) -> None:
    global _WORKER
    _WORKER = DocumentProcessor(config, perplexity_model_dir)


def _process_in_worker(first_index: int, items: list[tuple[int, bytes]]) -> BatchResult:
    assert _WORKER is not None
    return _WORKER.process(first_index, items)


def _read_batches(
    paths: Sequence[str], batch_size: int
) -> Iterator[tuple[str, int, list[tuple[int, bytes]]]]:
    """(path, global index of the first line, [(line number, raw line)]) in input order."""
    index = 0
    for path in paths:
        items: list[tuple[int, bytes]] = []
        with open_binary(path, "rb") as handle:
            for line_number, raw in enumerate(handle, start=1):
                items.append((line_number, raw))
                if len(items) == batch_size:
                    yield path, index, items
                    index += len(items)
                    items = []
        if items:
            yield path, index, items
            index += len(items)


def _results_in_order(
    config: CurationConfig, paths: Sequence[str], workers: int, model_dir: str | None
) -> Iterator[tuple[str, BatchResult]]:
    batches = _read_batches(paths, config.io.batch_size)
    if workers <= 1:
        processor = DocumentProcessor(config, model_dir)
        for path, first, items in batches:
            yield path, processor.process(first, items)
        return
    pending: deque[tuple[str, Future]] = deque()
    with ProcessPoolExecutor(
        max_workers=workers,
        mp_context=get_context("spawn"),
        initializer=_init_worker,
        initargs=(config, model_dir),
    ) as pool:
        try:
            for path, first, items in batches:
                pending.append((path, pool.submit(_process_in_worker, first, items)))
                if len(pending) >= 2 * workers:
                    done_path, future = pending.popleft()
                    yield done_path, _result(future)
            while pending:
                done_path, future = pending.popleft()
                yield done_path, _result(future)
        finally:
            for _, future in pending:
                future.cancel()


def _result(future: Future) -> BatchResult:
    try:
        return future.result()
    except BrokenProcessPool as exc:
        raise RuntimeError(
            "a curation worker process died: out of memory, killed, or the calling script "
            "cannot be imported by spawned processes (guard it with if __name__ == '__main__')"
        ) from exc


class _SurvivorStore:
    """Spill file of survivor lines plus their per-document keys, in input order."""

    def __init__(self, tmp_dir: Path, num_bands: int):
        self.tmp_dir = tmp_dir
        self.spill_path = tmp_dir / "survivors.jsonl"
        self._spill = open(self.spill_path, "w", encoding="utf-8", newline="\n")
        self.exact_keys = bytearray()
        self._band_files = [open(tmp_dir / f"band-{j:03d}.u64", "wb") for j in range(num_bands)]
        self.langs: list[str] = []
        self.lang_ids = array("H")
        self.num_bytes = array("q")
        # Perplexity verdicts as small codes into reason_names (0 = kept): bytes per document.
        self.reason_names: list[str | None] = [None]
        self.reason_codes = array("B")
        self.has_band_keys = array("B")
        self._last_index = -1

    def add_batch(self, survivors: list[Survivor]) -> None:
        for survivor in survivors:
            # "First in input order" decisions below rely on the spill being in input order.
            assert survivor.index > self._last_index, (survivor.index, self._last_index)
            self._last_index = survivor.index
            self._spill.write(survivor.line + "\n")
            self.exact_keys += survivor.exact_key
            if survivor.lang not in self.langs:
                self.langs.append(survivor.lang)
            self.lang_ids.append(self.langs.index(survivor.lang))
            self.num_bytes.append(survivor.num_bytes)
            if survivor.perplexity_reason not in self.reason_names:
                self.reason_names.append(survivor.perplexity_reason)
            self.reason_codes.append(self.reason_names.index(survivor.perplexity_reason))
            self.has_band_keys.append(1 if survivor.band_keys else 0)
        if self._band_files and survivors:
            num_bands = len(self._band_files)
            keys = np.zeros((len(survivors), num_bands), dtype=np.uint64)
            for row, survivor in enumerate(survivors):
                if survivor.band_keys:
                    keys[row] = np.frombuffer(survivor.band_keys, dtype=np.uint64)
            for band, handle in enumerate(self._band_files):
                handle.write(np.ascontiguousarray(keys[:, band]).tobytes())

    def finish_writing(self) -> None:
        self._spill.close()
        for handle in self._band_files:
            handle.close()

    def band_column(self, band: int) -> np.ndarray:
        return np.fromfile(self.tmp_dir / f"band-{band:03d}.u64", dtype=np.uint64)

    def __len__(self) -> int:
        return len(self.num_bytes)


def _prepare_perplexity_models(config: CurationConfig, output_dir: Path) -> str | None:
    ppl = config.perplexity
    if not ppl.enabled:
        return None
    if ppl.reference == "model_dir":
        read_manifest(ppl.model_dir)  # fail here, with a clear message, not inside a worker
        return ppl.model_dir
    from megatron_ext.curation.builtin_corpus import DEMO_LANGUAGES, builtin_documents
    from megatron_ext.curation.perplexity import train_perplexity_models

    languages = config.langid.languages or list(DEMO_LANGUAGES)
    model_dir = output_dir / "perplexity_models"

    def pairs(split: str) -> list[tuple[str, str]]:
        return [(d["source_lang"], d["text"]) for d in builtin_documents(languages, split)]

    train_perplexity_models(
        pairs("train"), model_dir, order=ppl.order, unit=ppl.unit, heldout_docs=pairs("heldout")
    )
    return str(model_dir)


def run_curation(
    config: CurationConfig,
    inputs: list[str],
    output_dir: str | Path,
    workers: int = 1,
    *,
    progress: bool = False,
) -> CurationReport:
    """Curate ``inputs`` (files or globs) into shards under ``output_dir``; returns the report.

    Raises ValueError (or its subclasses ConfigError / BadInputError) for unusable settings,
    missing inputs, an output directory that already holds curated shards, and, with
    ``io.strict``, the first bad input record.
    """
    validate_curation_config(config)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    paths = expand_inputs(inputs)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    stale = sorted(output_dir.glob(f"{config.io.output_prefix}-*.jsonl*"))
    if stale:
        raise ValueError(
            f"{output_dir} already holds curated shards ({stale[0].name}, ...); "
            "use an empty output directory or remove them"
        )
    started = time.perf_counter()
    model_dir = _prepare_perplexity_models(config, output_dir)
    tmp_dir = output_dir / TMP_DIR_NAME
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir()
    try:
        stats, bad_input, store = _first_pass(config, paths, workers, model_dir, tmp_dir, progress)
        keep = _decide(config, store, stats)
        output_files = _write_output(config, store, keep, output_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    details = _details(config, model_dir)
    report = CurationReport(
        stats=stats,
        bad_input=bad_input,
        input_files=paths,
        output_files=[os.path.basename(p) for p in output_files],
        workers=workers,
        elapsed_s=time.perf_counter() - started,
        details=details,
        config=to_dict(config),
    )
    report.write(output_dir)
    return report


def _first_pass(
    config: CurationConfig,
    paths: Sequence[str],
    workers: int,
    model_dir: str | None,
    tmp_dir: Path,
    progress: bool,
) -> tuple[CurationStats, BadInputReport, _SurvivorStore]:
    from tqdm import tqdm

    stats = CurationStats()
    bad_input = BadInputReport()
    num_bands = config.near_dedup.num_bands if config.near_dedup.enabled else 0
    store = _SurvivorStore(tmp_dir, num_bands)
    started = time.perf_counter()
    read_bytes = 0
    bar = tqdm(unit="doc", unit_scale=True, disable=not progress, desc="curating")
    try:
        for path, result in _results_in_order(config, paths, workers, model_dir):
            for line_number, reason, detail in result.bad:
                if config.io.strict:
                    raise BadInputError(path, line_number, reason, detail)
                bad_input.add(reason, path, line_number)
            stats.merge(result.stats)
            store.add_batch(result.survivors)
            read_bytes += result.num_raw_bytes
            bar.update(result.num_lines)
            elapsed = max(time.perf_counter() - started, 1e-9)
            bar.set_postfix_str(f"{read_bytes / 1e6 / elapsed:.2f} MB/s", refresh=False)
    finally:
        bar.close()
        store.finish_writing()
    return stats, bad_input, store


def _decide(config: CurationConfig, store: _SurvivorStore, stats: CurationStats) -> np.ndarray:
    """Stages 3-5 over all survivors; records their stats and returns the keep mask."""
    n = len(store)
    keep = np.ones(n, dtype=bool)
    if config.exact_dedup.enabled and n:
        keys = np.frombuffer(bytes(store.exact_keys), dtype=np.uint8).reshape(n, 16)
        duplicate = exact_duplicate_mask(keys)
        _record(stats, "exact_dedup", store, keep, duplicate, "exact_duplicate")
        keep &= ~duplicate
    else:
        _record(stats, "exact_dedup", store, keep, np.zeros(n, dtype=bool), "")
    if config.near_dedup.enabled and n:
        with_words = np.frombuffer(store.has_band_keys, dtype=np.uint8).astype(bool)
        rows = np.flatnonzero(keep & with_words)
        columns = (store.band_column(b)[rows] for b in range(config.near_dedup.num_bands))
        near = np.zeros(n, dtype=bool)
        near[rows] = near_duplicate_mask_from_columns(columns, len(rows))
        _record(stats, "near_dedup", store, keep, near, "near_duplicate")
        keep &= ~near
    else:
        _record(stats, "near_dedup", store, keep, np.zeros(n, dtype=bool), "")
    for i in range(n):
        if keep[i]:
            reason = store.reason_names[store.reason_codes[i]]
            lang = store.langs[store.lang_ids[i]]
            stats.record("perplexity", lang, store.num_bytes[i], store.num_bytes[i], reason)
            if reason is not None:
                keep[i] = False
    return keep


def _record(
    stats: CurationStats,
    stage: str,
    store: _SurvivorStore,
    entering: np.ndarray,
    removed: np.ndarray,
    reason: str,
) -> None:
    """Record a driver-side stage: ``entering`` documents arrive, ``removed`` ones leave."""
    lang_ids = np.frombuffer(store.lang_ids, dtype=np.uint16)
    sizes = np.frombuffer(store.num_bytes, dtype=np.int64)
    for lang_id, lang in enumerate(store.langs):
        mine = entering & (lang_ids == lang_id)
        if not mine.any():
            continue
        kept = mine & ~removed
        counts = stats.stages[stage].setdefault(lang, StageCounts())
        counts.docs_in += int(mine.sum())
        counts.bytes_in += int(sizes[mine].sum())
        counts.docs_out += int(kept.sum())
        counts.bytes_out += int(sizes[kept].sum())
        num_removed = int((mine & removed).sum())
        if num_removed:
            counts.removed[reason] = counts.removed.get(reason, 0) + num_removed


def _write_output(
    config: CurationConfig, store: _SurvivorStore, keep: np.ndarray, output_dir: Path
) -> list[str]:
    io_cfg = config.io
    with ShardedJsonlWriter(
        output_dir, io_cfg.output_prefix, io_cfg.compression, io_cfg.max_records_per_shard
    ) as writer:
        with open(store.spill_path, encoding="utf-8") as spill:
            for flag, line in zip(keep, spill):
                if flag:
                    writer.write_line(line.rstrip("\n"))
    return writer.paths


def _details(config: CurationConfig, model_dir: str | None) -> dict[str, Any]:
    nd = config.near_dedup
    details: dict[str, Any] = {
        "near_dedup": {
            "ngram_size": nd.ngram_size,
            "num_bands": nd.num_bands,
            "rows_per_band": nd.rows_per_band,
            "num_permutations": nd.num_bands * nd.rows_per_band,
            "implied_jaccard_threshold": round(
                near_dedup_threshold(nd.num_bands, nd.rows_per_band), 4
            ),
        }
    }
    if model_dir is not None:
        ppl = PerplexityFilter(config.perplexity, model_dir)
        details["perplexity"] = {
            "model_dir": str(model_dir),
            "cutoffs": {
                lang: dict(zip(("head_below", "tail_above", "remove_above"), ppl.cutoffs(lang)))
                for lang in ppl.languages
            },
        }
    return details
