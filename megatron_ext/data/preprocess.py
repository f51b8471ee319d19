"""Tokenize JSONL into Megatron indexed datasets, in parallel and with bounded memory.

    from megatron_ext.data.preprocess import preprocess
    result = preprocess(["data/*.jsonl.zst"], "data/tokens/web", "SentencePieceTokenizer",
                        "out/tokenizer/tokenizer.model", append_eod=True, workers=8)
    result.output_prefixes["text"]   # data/tokens/web_text_document (.bin + .idx)

How it runs (see ``preprocess_reader`` for the tasks):

1. The input is cut into tasks of about ``chunk_bytes`` that do not depend on the worker count.
2. Worker processes each take a task, read and parse its lines, tokenize ``batch_docs``
   documents per call and write the task's own small dataset (a "part") to a scratch folder.
3. The main process takes the finished parts strictly in task order, appends them to the
   output and deletes them. At most ``2 x workers`` tasks are in flight (back-pressure), so
   memory and scratch space stay flat however large the input is; the document order is the
   input order for any worker count.

Per document and key, the ids of each sentence form one sequence, the end-of-document id is
appended to the last one with ``append_eod`` (as Megatron-LM's ``preprocess_data.py`` does),
and ids are stored as uint16 when the vocabulary has at most 65,536 ids, else int32.
Workers are forked while the calling process runs no other Python thread (they start at once
and share its loaded tokenizer) and spawned otherwise; spawned workers import the caller's main
module, so call ``preprocess`` with ``workers > 1`` from under ``if __name__ == "__main__":`` in
a script (the tools do).
Bad records are counted per reason with their line numbers and skipped, or stop the run with
``strict`` (``BadInputError``); either way the output is complete or absent, never partial.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import multiprocessing
import os
import shutil
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from megatron_ext.data.indexed_writer import IndexedDatasetWriter, dtype_for_vocab
from megatron_ext.data.jsonl_io import BadInputError, BadInputReport, expand_inputs
from megatron_ext.data.preprocess_reader import (
    BadRecord,
    InputTask,
    iter_task_lines,
    parse_line,
    plan_tasks,
)
from megatron_ext.data.provenance import write_stats
from megatron_ext.tokenizer.loading import load_tokenizer

logger = logging.getLogger(__name__)

MAX_EXAMPLES = 5
START_METHODS = ("auto", "fork", "spawn")


@dataclass
class TaskResult:
    """What a worker reports for one task; its ids are in the part files."""

    index: int
    path: str
    part_prefix: str
    num_lines: int = 0
    num_docs: int = 0
    num_tokens: int = 0
    num_bytes: int = 0
    max_token_id: int = -1
    bad_counts: dict[str, int] = field(default_factory=dict)
    bad_lines: dict[str, list[int]] = field(default_factory=dict)
    fatal: tuple[int, str, str] | None = None  # (line in task, reason, detail) with strict


@dataclass
class PreprocessResult:
    """The datasets written and what it took."""

    output_prefixes: dict[str, str]
    num_docs: int
    num_tokens: int
    num_bytes: int
    seconds: float
    dtype: str
    bad_input: BadInputReport
    max_token_id: int = -1
    """The largest id written (-1: no token); training refuses a model.vocab_size at or below it."""

    def summary(self) -> str:
        rate = self.num_docs / self.seconds if self.seconds else 0.0
        return (
            f"{self.num_docs} documents, {self.num_tokens} tokens, {self.num_bytes / 1e6:.1f} MB "
            f"in {self.seconds:.1f} s ({rate:.0f} docs/s), dtype {self.dtype}\n"
            + self.bad_input.summary()
        )


@dataclass(frozen=True)
class _WorkerSettings:
    tokenizer_type: str
    tokenizer_model: str
    json_keys: tuple[str, ...]
    append_eod: bool
    strict: bool
    max_doc_bytes: int | None
    batch_docs: int
    dtype: str
    scratch_dir: str


# Per-process state of a pool worker: the pool initializer sets the tokenizer once.
_WORKER: dict[str, Any] = {}


def _init_worker(settings: _WorkerSettings, tokenizer: Any) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _WORKER["settings"] = settings
    if tokenizer is not None:  # inherited from the parent (fork)
        _WORKER["tokenizer"] = tokenizer
        return
    try:
        _WORKER["tokenizer"] = load_tokenizer(settings.tokenizer_type, settings.tokenizer_model)
    except Exception as exc:  # reported by the first task: a failing initializer is respawned
        _WORKER["error"] = f"{type(exc).__name__}: {exc}"


def _run_task(task: InputTask) -> TaskResult:
    if "error" in _WORKER:
        raise ValueError(f"a preprocessing worker could not load the tokenizer: {_WORKER['error']}")
    settings: _WorkerSettings = _WORKER["settings"]
    tokenizer = _WORKER["tokenizer"]
    part = os.path.join(settings.scratch_dir, f"part-{task.index:09d}")
    result = TaskResult(task.index, task.path, part)
    writers = [
        IndexedDatasetWriter(f"{part}_{key}", np.dtype(settings.dtype), buffer_entries=1 << 30)
        for key in settings.json_keys
    ]
    batch: list[list[list[str]]] = []
    for line_number, raw in enumerate(iter_task_lines(task), start=1):
        result.num_lines = line_number
        result.num_bytes += len(raw) + 1
        try:
            batch.append(parse_line(raw, settings.json_keys, settings.max_doc_bytes))
        except BadRecord as bad:
            if settings.strict:
                result.fatal = (line_number, bad.reason, bad.detail)
                break
            result.bad_counts[bad.reason] = result.bad_counts.get(bad.reason, 0) + 1
            lines = result.bad_lines.setdefault(bad.reason, [])
            if len(lines) < MAX_EXAMPLES:
                lines.append(line_number)
            continue
        if len(batch) >= settings.batch_docs:
            _write_batch(batch, tokenizer, writers, settings, result)
            batch = []
    if batch:
        _write_batch(batch, tokenizer, writers, settings, result)
    for writer in writers:
        writer.finalize()
    return result


def _write_batch(batch, tokenizer, writers, settings: _WorkerSettings, result: TaskResult) -> None:
    """Tokenize one batch of documents per key and append it; counts go into ``result``.

    Each non-empty sentence becomes one sequence; with ``append_eod`` the end-of-document id
    ends the last sequence of each document.
    """
    for key_index, writer in enumerate(writers):
        sentences = [doc[key_index] for doc in batch]
        ids, lengths = tokenizer.tokenize_flat(list(itertools.chain.from_iterable(sentences)))
        per_doc = np.fromiter(map(len, sentences), np.int64, len(sentences))
        kept = lengths > 0
        seq_lengths = lengths[kept]
        seqs_per_doc = np.bincount(
            np.repeat(np.arange(len(sentences)), per_doc)[kept], minlength=len(sentences)
        )
        if settings.append_eod:
            last = (np.cumsum(seqs_per_doc) - 1)[seqs_per_doc > 0]
            ids = np.insert(ids, np.cumsum(seq_lengths)[last], tokenizer.eod)
            seq_lengths[last] += 1
        writer.add_batch(ids.astype(writer.dtype), seq_lengths, seqs_per_doc)
        result.num_tokens += int(ids.size)
        if ids.size:
            result.max_token_id = max(result.max_token_id, int(ids.max()))
    result.num_docs += len(batch)


def preprocess(
    inputs: Sequence[str] | str,
    output_prefix: str,
    tokenizer_type: str,
    tokenizer_model: str,
    *,
    json_keys: Sequence[str] = ("text",),
    append_eod: bool = False,
    workers: int = 1,
    strict: bool = False,
    max_doc_bytes: int | None = None,
    chunk_bytes: int = 1 << 20,
    batch_docs: int = 256,
    dtype: str | None = None,
    progress: bool = True,
    start_method: str = "auto",
) -> PreprocessResult:
    """Tokenize ``inputs`` (JSONL files or globs; plain, .gz, .zst) into indexed datasets.

    Writes ``{output_prefix}_{key}_document.bin/.idx`` per JSON key and
    ``{output_prefix}_preprocess_stats.json``. ``workers`` <= 1 runs in this process.
    ``dtype`` ("uint16" / "int32") overrides the choice by vocabulary size. ``start_method``
    ("auto", "fork", "spawn") is how worker processes start (see ``_start_method``).
    """
    start = time.perf_counter()
    if isinstance(inputs, str):
        inputs = [inputs]
    if not json_keys or len(set(json_keys)) != len(json_keys):
        raise ValueError(f"json_keys must be distinct and non-empty, got {list(json_keys)}")
    if batch_docs < 1:
        raise ValueError(f"batch_docs must be positive, got {batch_docs}")
    if start_method not in START_METHODS:
        raise ValueError(f"start_method must be one of {list(START_METHODS)}, got {start_method!r}")
    paths = expand_inputs(list(inputs))
    tokenizer = load_tokenizer(tokenizer_type, tokenizer_model)
    chosen = np.dtype(dtype) if dtype else dtype_for_vocab(tokenizer.vocab_size)
    if chosen not in (np.dtype(np.uint16), np.dtype(np.int32)):
        raise ValueError(f"dtype must be uint16 or int32, got {dtype!r}")
    if chosen == np.dtype(np.uint16) and tokenizer.vocab_size > 65536:
        raise ValueError(f"vocab_size {tokenizer.vocab_size} does not fit uint16; use int32")
    out_dir = Path(output_prefix).parent
    out_dir.mkdir(parents=True, exist_ok=True)
    prefixes = {key: f"{output_prefix}_{key}_document" for key in json_keys}
    existing = [
        p for p in prefixes.values() if Path(p + ".bin").exists() or Path(p + ".idx").exists()
    ]
    if existing:
        logger.warning(
            "replacing the existing dataset(s) %s; a run that trained on them will refuse to "
            "resume on the new content (unless it allows data.data_path to change)",
            ", ".join(existing),
        )
    scratch = tempfile.mkdtemp(prefix=Path(output_prefix).name + ".parts-", dir=out_dir)
    settings = _WorkerSettings(
        tokenizer_type,
        str(tokenizer_model),
        tuple(json_keys),
        append_eod,
        strict,
        max_doc_bytes,
        batch_docs,
        chosen.name,
        scratch,
    )
    try:
        # The pool first: forked workers then inherit no output files and no progress thread.
        with _worker_pool(settings, workers, tokenizer, start_method) as pool:
            tasks = _run_tasks(plan_tasks(paths, chunk_bytes), settings, pool, workers, tokenizer)
            meter = _write_outputs(tasks, prefixes, chosen, progress, start)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    outcome = PreprocessResult(
        prefixes,
        meter.docs,
        meter.tokens,
        meter.bytes,
        meter.elapsed(),
        chosen.name,
        meter.report,
        meter.max_token_id,
    )
    _write_stats(
        outcome, output_prefix, paths, tokenizer, tokenizer_type, tokenizer_model, append_eod
    )
    return outcome


def _write_outputs(
    results: Iterator[TaskResult],
    prefixes: dict[str, str],
    dtype: np.dtype,
    progress: bool,
    start: float,
) -> _Progress:
    """Appends every task's result to the outputs; returns the counts (no outputs on error)."""
    writers = {key: IndexedDatasetWriter(prefix, dtype) for key, prefix in prefixes.items()}
    meter = _Progress(progress, start)
    try:
        with contextlib.closing(results):
            _collect(results, writers, meter)
        for writer in writers.values():
            writer.finalize()
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    finally:
        meter.close()
    return meter


def _collect(
    results: Iterator[TaskResult], writers: dict[str, IndexedDatasetWriter], meter: _Progress
) -> None:
    """Append each task's parts to the outputs, in order; raise on a fatal bad record."""
    lines_seen: dict[str, int] = {}
    for result in results:
        first = lines_seen.get(result.path, 0)
        lines_seen[result.path] = first + result.num_lines
        _add_bad_input(meter.report, result, first)
        if result.fatal is not None:
            line, reason, detail = result.fatal
            raise BadInputError(result.path, first + line, reason, detail)
        for key, writer in writers.items():
            writer.append_dataset(f"{result.part_prefix}_{key}")
            for suffix in (".bin", ".idx"):
                os.remove(f"{result.part_prefix}_{key}{suffix}")
        meter.update(result)


def _start_method(requested: str) -> str:
    """``requested``, or for "auto": ``fork`` while only the main Python thread runs, else spawn.

    Forked workers start at once and share the tokenizer already loaded here; spawned ones
    start a new interpreter and load their own. Another Python thread (a progress monitor, a
    server) may hold a lock at the moment of the fork and leave it held in the child, so then
    workers are spawned. Native thread pools of the libraries the workers use (OpenBLAS, which
    numpy starts on import; Hugging Face ``tokenizers``) are reset by those libraries at fork.
    """
    if requested != "auto":
        return requested
    if "fork" not in multiprocessing.get_all_start_methods():
        return "spawn"
    return "fork" if threading.active_count() == 1 else "spawn"


@contextlib.contextmanager
def _worker_pool(
    settings: _WorkerSettings, workers: int, tokenizer: Any, start_method: str
) -> Iterator[Any]:
    """A pool of ``workers`` processes, or None to run in this process (``workers`` <= 1)."""
    if workers <= 1:
        yield None
        return
    method = _start_method(start_method)
    shared = tokenizer if method == "fork" else None  # spawned workers load their own
    context = multiprocessing.get_context(method)
    pool = context.Pool(workers, initializer=_init_worker, initargs=(settings, shared))
    logger.debug("preprocess: %d %s workers", workers, method)
    try:
        yield pool
        pool.close()
    finally:
        pool.terminate()
        pool.join()


def _run_tasks(
    tasks: Iterator[InputTask], settings: _WorkerSettings, pool: Any, workers: int, tokenizer: Any
) -> Iterator[TaskResult]:
    """Results in task order, with at most ``2 x workers`` tasks submitted and not yet taken."""
    if pool is None:
        _WORKER["settings"], _WORKER["tokenizer"] = settings, tokenizer
        try:
            for task in tasks:
                yield _run_task(task)
        finally:
            _WORKER.clear()
        return
    pending: deque = deque()
    for task in tasks:
        pending.append(pool.apply_async(_run_task, (task,)))
        if len(pending) >= 2 * workers:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def _add_bad_input(report: BadInputReport, result: TaskResult, first_line: int) -> None:
    if not result.bad_counts:
        return
    part = BadInputReport(max_examples=report.max_examples)
    part.counts = dict(result.bad_counts)
    part.examples = {
        result.path: {r: [first_line + n for n in lines] for r, lines in result.bad_lines.items()}
    }
    report.merge(part)


class _Progress:
    """Counts and bad input so far, and a tqdm bar over documents (docs/s, MB/s, tokens/s)."""

    def __init__(self, enabled: bool, start: float):
        self.start = start
        self.docs = self.tokens = self.bytes = 0
        self.max_token_id = -1
        self.report = BadInputReport(max_examples=MAX_EXAMPLES)
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(unit=" docs", file=sys.stderr, mininterval=1.0, dynamic_ncols=True)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def update(self, result: TaskResult) -> None:
        self.docs += result.num_docs
        self.tokens += result.num_tokens
        self.bytes += result.num_bytes
        self.max_token_id = max(self.max_token_id, result.max_token_id)
        if self._bar is not None:
            seconds = max(self.elapsed(), 1e-9)
            self._bar.set_postfix_str(
                f"{self.bytes / 1e6 / seconds:.1f} MB/s, {self.tokens / seconds:,.0f} tok/s",
                refresh=False,
            )
            self._bar.update(result.num_docs)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _write_stats(
    result: PreprocessResult,
    output_prefix: str,
    paths: list[str],
    tokenizer: Any,
    tokenizer_type: str,
    tokenizer_model: str,
    append_eod: bool,
) -> None:
    stats = {
        "inputs": paths,
        "outputs": result.output_prefixes,
        "tokenizer_type": tokenizer_type,
        "tokenizer_model": str(tokenizer_model),
        "tokenizer_vocab_size": tokenizer.vocab_size,
        "eod_id": tokenizer.eod,
        "append_eod": append_eod,
        "dtype": result.dtype,
        "num_docs": result.num_docs,
        "num_tokens": result.num_tokens,
        "max_token_id": result.max_token_id,
        "num_bytes": result.num_bytes,
        "seconds": round(result.seconds, 3),
        "bad_input": result.bad_input.to_dict(),
    }
    write_stats(output_prefix, stats)
