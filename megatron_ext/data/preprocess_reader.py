"""Split JSONL input into independent tasks and parse their lines, for parallel preprocessing.

A task is a run of whole lines of one file:

- a plain file is cut into byte ranges of about ``chunk_bytes``; a line belongs to the range in
  which it starts, and the worker that owns the range reads it straight from the file;
- a ``.gz`` / ``.zst`` file cannot be entered in the middle, so the main process decompresses it
  (through ``jsonl_io.open_binary``) and hands out blocks of about ``chunk_bytes`` of lines.

Task boundaries depend on the input and ``chunk_bytes`` only, never on the number of workers,
so the output is the same for any worker count. Workers number lines from 1 within their task;
the main process, which sees the tasks of a file in order, turns them into line numbers of the
file.

Lines are checked with the same reasons as ``jsonl_io.iter_jsonl`` (``BAD_INPUT_REASONS``) plus
``lone_surrogate`` (a JSON escape such as ``"\\ud800"`` that is not encodable text). A field may
hold a string or, as in Megatron-LM, a list of strings (sentences).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from megatron_ext.data.jsonl_io import UTF8_BOM, compression_of, open_binary


@dataclass(frozen=True)
class InputTask:
    """One unit of work: ``[start, end)`` bytes of a plain file, or a block of lines."""

    index: int
    path: str
    start: int = 0
    end: int = 0
    data: bytes | None = None


def plan_tasks(paths: Sequence[str], chunk_bytes: int) -> Iterator[InputTask]:
    """Tasks over ``paths`` in input order (lazily: compressed input is read as it goes)."""
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    index = 0
    for path in paths:
        if compression_of(path) == "none":
            size = os.path.getsize(path)
            for start in range(0, size, chunk_bytes):
                yield InputTask(index, path, start, min(start + chunk_bytes, size))
                index += 1
        else:
            for block in _line_blocks(path, chunk_bytes):
                yield InputTask(index, path, data=block)
                index += 1


def _line_blocks(path: str, chunk_bytes: int) -> Iterator[bytes]:
    block: list[bytes] = []
    size = 0
    with open_binary(path, "rb") as handle:
        for line in handle:
            block.append(line if line.endswith(b"\n") else line + b"\n")
            size += len(line)
            if size >= chunk_bytes:
                yield b"".join(block)
                block, size = [], 0
    if block:
        yield b"".join(block)


def iter_task_lines(task: InputTask) -> Iterator[bytes]:
    """The raw lines of a task (without their line ends), in order."""
    if task.data is not None:
        data = task.data[:-1] if task.data.endswith(b"\n") else task.data
        yield from data.split(b"\n")
        return
    with open(task.path, "rb", buffering=1 << 20) as f:
        position = task.start
        if task.start > 0:
            # Skip the line that started before this range: it belongs to the previous task.
            f.seek(task.start - 1)
            position = task.start - 1 + len(f.readline())
        while position < task.end:
            line = f.readline()
            if not line:
                return
            position += len(line)
            yield line.rstrip(b"\n")


class BadRecord(Exception):
    """A line that cannot be used; ``reason`` is one of the bad-input reasons."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


def parse_line(raw: bytes, json_keys: Sequence[str], max_doc_bytes: int | None) -> list[list[str]]:
    """The sentences of each key of one JSONL line; raises ``BadRecord`` for a bad line.

    A record is kept whole or not at all, so the datasets of several keys stay aligned.
    """
    raw = raw.rstrip(b"\r").removeprefix(UTF8_BOM)
    if max_doc_bytes is not None and len(raw) > max_doc_bytes:
        raise BadRecord("too_large", f"{len(raw)} bytes > max_doc_bytes={max_doc_bytes}")
    if not raw.strip():
        raise BadRecord("blank_line")
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRecord("invalid_utf8", str(exc)) from None
    try:
        record = json.loads(line)
    except ValueError as exc:
        raise BadRecord("malformed_json", str(exc)) from None
    if not isinstance(record, dict):
        raise BadRecord("not_an_object", f"got {type(record).__name__}")
    fields = []
    for key in json_keys:
        if key not in record:
            raise BadRecord("missing_text_key", f"no key {key!r}")
        value = record[key]
        sentences = [value] if isinstance(value, str) else value
        if not isinstance(sentences, list) or not all(isinstance(s, str) for s in sentences):
            raise BadRecord("non_string_text", f"{key!r} is {type(value).__name__}")
        if not any(s.strip() for s in sentences):
            raise BadRecord("empty_text", f"{key!r} is empty")
        for sentence in sentences:
            try:
                sentence.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise BadRecord("lone_surrogate", str(exc)) from None
        fields.append(sentences)
    return fields
