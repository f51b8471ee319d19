"""Streaming JSONL input and sharded JSONL output, with bad-input accounting.

Reading is line by line (memory is bounded by the longest line), for plain, ``.gz`` and ``.zst``
files. Each line's bytes are decoded on their own, so one line of invalid UTF-8 is counted and
skipped instead of stopping the whole file. Every skipped record lands in a ``BadInputReport`` with
its reason and the first line numbers per file; ``strict=True`` turns the first one into an error.

    report = BadInputReport()
    for rec in iter_jsonl(expand_inputs(["data/*.jsonl.zst"]), text_key="text", report=report):
        ...
    print(report.summary())

Writing goes through ``ShardedJsonlWriter``: each shard is written under a temporary name and
renamed into place when it is complete, so a reader never sees a half-written shard.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

import zstandard

Compression = Literal["none", "gz", "zst"]

# The reasons iter_jsonl uses; the report accepts other reasons too.
BAD_INPUT_REASONS = (
    "malformed_json",
    "invalid_utf8",
    "lone_surrogate",
    "not_an_object",
    "missing_text_key",
    "non_string_text",
    "empty_text",
    "too_large",
    "blank_line",
)

_SUFFIX = {"none": "", "gz": ".gz", "zst": ".zst"}
_SURROGATE_ESCAPE_RE = re.compile(r"\\u[dD][89a-fA-F]")
UTF8_BOM = b"\xef\xbb\xbf"
"""A byte-order mark at the start of a line (a file saved "with BOM", or such files concatenated)
marks the encoding and is not part of the JSON: it is dropped, not reported as malformed."""


class BadInputError(ValueError):
    """A bad input record met in strict mode; the message names the file, line and reason."""

    def __init__(self, path: str, line_number: int, reason: str, detail: str = ""):
        self.path = path
        self.line_number = line_number
        self.reason = reason
        message = f"{path}:{line_number}: {reason}"
        if detail:
            message += f" ({detail})"
        super().__init__(message)


@dataclass(frozen=True)
class JsonlRecord:
    """One good input record: where it came from, the parsed object and its text field."""

    path: str
    line_number: int  # 1-based
    record: dict
    text: str


@dataclass
class BadInputReport:
    """Counts of skipped records per reason, and the first line numbers per file and reason."""

    max_examples: int = 5
    """How many line numbers to keep per (file, reason)."""
    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, dict[str, list[int]]] = field(default_factory=dict)

    def add(self, reason: str, path: str, line_number: int) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        lines = self.examples.setdefault(path, {}).setdefault(reason, [])
        if len(lines) < self.max_examples:
            lines.append(line_number)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def merge(self, other: BadInputReport) -> None:
        """Add ``other``'s counts and examples into this report (examples stay sorted, capped)."""
        for reason, count in other.counts.items():
            self.counts[reason] = self.counts.get(reason, 0) + count
        for path, per_reason in other.examples.items():
            mine = self.examples.setdefault(path, {})
            for reason, lines in per_reason.items():
                merged = sorted(set(mine.get(reason, [])) | set(lines))
                mine[reason] = merged[: self.max_examples]

    def to_dict(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "counts": dict(sorted(self.counts.items())),
            "first_lines": {
                path: dict(sorted(per_reason.items()))
                for path, per_reason in sorted(self.examples.items())
            },
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], max_examples: int = 5) -> BadInputReport:
        report = cls(max_examples=max_examples)
        report.counts = dict(data.get("counts", {}))
        report.examples = {
            path: {reason: list(lines) for reason, lines in per_reason.items()}
            for path, per_reason in data.get("first_lines", {}).items()
        }
        return report

    def summary(self) -> str:
        if not self.total:
            return "bad input: none"
        lines = [f"bad input: {self.total} record(s) skipped"]
        for reason, count in sorted(self.counts.items()):
            lines.append(f"  {reason}: {count}")
        for path, per_reason in sorted(self.examples.items()):
            for reason, numbers in sorted(per_reason.items()):
                shown = ", ".join(str(n) for n in numbers)
                lines.append(f"  {path}: {reason} at line(s) {shown}")
        return "\n".join(lines)


def expand_inputs(patterns: Sequence[str]) -> list[str]:
    """Files and glob patterns to a sorted, de-duplicated list of files.

    Raises ValueError naming the first pattern that matches no file.
    """
    if isinstance(patterns, (str, os.PathLike)):
        patterns = [os.fspath(patterns)]
    found: set[str] = set()
    for pattern in patterns:
        pattern = os.fspath(pattern)
        if glob.has_magic(pattern):
            matches = [p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)]
        else:
            matches = [pattern] if os.path.isfile(pattern) else []
        if not matches:
            raise ValueError(f"input pattern {pattern!r} matches no file")
        found.update(os.path.normpath(m) for m in matches)
    return sorted(found)


def compression_of(path: str | os.PathLike) -> Compression:
    """The compression implied by a file name's suffix."""
    name = os.fspath(path)
    if name.endswith(".gz"):
        return "gz"
    if name.endswith(".zst") or name.endswith(".zstd"):
        return "zst"
    return "none"


def open_binary(path: str | os.PathLike, mode: str = "rb") -> IO[bytes]:
    """Open a plain, ``.gz`` or ``.zst`` file in binary mode ("rb" or "wb")."""
    if mode not in ("rb", "wb"):
        raise ValueError(f"open_binary mode must be 'rb' or 'wb', got {mode!r}")
    kind = compression_of(path)
    if mode == "wb":
        return _open_binary_as(Path(path), kind)
    if kind == "gz":
        return gzip.open(path, "rb")
    if kind == "zst":
        return io.BufferedReader(zstandard.open(path, "rb"))
    return open(path, "rb")


class _OwningGzip(gzip.GzipFile):
    """A deterministic gzip writer that closes the file object it wraps."""

    def __init__(self, raw: IO[bytes]):
        super().__init__(filename="", mode="wb", fileobj=raw, mtime=0)
        self._raw = raw

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._raw.close()


def open_text(path: str | os.PathLike, mode: str = "r") -> IO[str]:
    """Open a plain, ``.gz`` or ``.zst`` file as UTF-8 text ("r"/"rt" or "w"/"wt").

    Reading never fails on invalid UTF-8: each bad byte comes through as a lone surrogate
    (``errors="surrogateescape"``), so the line that holds it can be found and rejected on its own
    (``line.encode("utf-8")`` raises for exactly those lines). ``iter_jsonl`` does that check.
    """
    if mode in ("r", "rt"):
        return io.TextIOWrapper(open_binary(path, "rb"), encoding="utf-8", errors="surrogateescape")
    if mode in ("w", "wt"):
        return io.TextIOWrapper(open_binary(path, "wb"), encoding="utf-8", newline="\n")
    raise ValueError(f"open_text mode must be 'r' or 'w', got {mode!r}")


def iter_jsonl(
    paths: Iterable[str] | str,
    text_key: str = "text",
    report: BadInputReport | None = None,
    strict: bool = False,
    max_doc_bytes: int | None = None,
) -> Iterator[JsonlRecord]:
    """Yield the good records of JSONL files in order; bad ones are counted and skipped.

    ``max_doc_bytes`` bounds the raw line length (checked before parsing). With ``strict=True``
    the first bad record raises ``BadInputError`` instead.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [os.fspath(paths)]
    if report is None:
        report = BadInputReport()
    for path in paths:
        yield from _iter_file(os.fspath(path), text_key, report, strict, max_doc_bytes)


def parse_jsonl_line(
    raw: bytes, text_key: str = "text", max_doc_bytes: int | None = None
) -> tuple[dict | None, str, str]:
    """Parse one raw JSONL line (newline may be included).

    Returns ``(record, text, "")`` for a good record, or ``(None, reason, detail)`` with a reason
    from ``BAD_INPUT_REASONS``. Used by ``iter_jsonl`` and by tools that parse in worker processes.
    """
    raw = raw.rstrip(b"\r\n").removeprefix(UTF8_BOM)
    if max_doc_bytes is not None and len(raw) > max_doc_bytes:
        return None, "too_large", f"{len(raw)} bytes > max_doc_bytes={max_doc_bytes}"
    if not raw.strip():
        return None, "blank_line", ""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, "invalid_utf8", str(exc)
    try:
        record = json.loads(line)
    except ValueError as exc:
        return None, "malformed_json", str(exc)
    if _SURROGATE_ESCAPE_RE.search(line):
        # Valid JSON can spell lone UTF-16 surrogates ("\ud800"), which are not text: they
        # cannot be encoded again, so writing the record out would fail later.
        try:
            json.dumps(record, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as exc:
            return None, "lone_surrogate", str(exc)
    if not isinstance(record, dict):
        return None, "not_an_object", f"got {type(record).__name__}"
    if text_key not in record:
        return None, "missing_text_key", f"no key {text_key!r}"
    text = record[text_key]
    if not isinstance(text, str):
        return None, "non_string_text", f"{text_key!r} is {type(text).__name__}"
    if not text.strip():
        return None, "empty_text", ""
    return record, text, ""


def _iter_file(
    path: str, text_key: str, report: BadInputReport, strict: bool, max_doc_bytes: int | None
) -> Iterator[JsonlRecord]:
    with open_binary(path, "rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            record, text_or_reason, detail = parse_jsonl_line(raw, text_key, max_doc_bytes)
            if record is None:
                if strict:
                    raise BadInputError(path, line_number, text_or_reason, detail)
                report.add(text_or_reason, path, line_number)
                continue
            yield JsonlRecord(
                path=path, line_number=line_number, record=record, text=text_or_reason
            )


def dumps_record(record: dict) -> str:
    """One JSONL line (no newline): UTF-8 kept as is, no spaces after separators."""
    return json.dumps(record, ensure_ascii=False, separators=(",", ":"))


class ShardedJsonlWriter:
    """Write records into ``{prefix}-{index:05d}.jsonl[.gz|.zst]`` shards under ``output_dir``.

    A shard is written as ``<name>.tmp`` and renamed to ``<name>`` when it holds
    ``max_records_per_shard`` records or the writer is closed. Leaving a ``with`` block by an
    exception deletes every shard of the writer, finished or not: a part of the shards would look
    like a complete output to whatever reads them next. An empty writer produces no file.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        prefix: str,
        compression: Compression = "none",
        max_records_per_shard: int = 100_000,
    ):
        if compression not in _SUFFIX:
            raise ValueError(f"compression must be one of {list(_SUFFIX)}, got {compression!r}")
        if max_records_per_shard < 1:
            raise ValueError(f"max_records_per_shard must be >= 1, got {max_records_per_shard}")
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.compression: Compression = compression
        self.max_records_per_shard = max_records_per_shard
        self.paths: list[str] = []
        """Finished shards, in order."""
        self.num_records = 0
        self._handle: IO[str] | None = None
        self._tmp_path: Path | None = None
        self._final_path: Path | None = None
        self._in_shard = 0
        self._closed = False

    def shard_name(self, index: int) -> str:
        return f"{self.prefix}-{index:05d}.jsonl{_SUFFIX[self.compression]}"

    def write(self, record: dict) -> None:
        self.write_line(dumps_record(record))

    def write_line(self, line: str) -> None:
        """Write one already-serialised JSON line (without its newline)."""
        if self._closed:
            raise ValueError("write to a closed ShardedJsonlWriter")
        if self._handle is None:
            self._open_shard()
        assert self._handle is not None
        self._handle.write(line)
        self._handle.write("\n")
        self._in_shard += 1
        self.num_records += 1
        if self._in_shard >= self.max_records_per_shard:
            self._finish_shard()

    def close(self) -> list[str]:
        """Finish the open shard; returns the paths of all shards written."""
        if not self._closed:
            self._finish_shard()
            self._closed = True
        return list(self.paths)

    def abort(self) -> None:
        """Delete every shard of this writer, the unfinished one and the finished ones."""
        if self._handle is not None:
            self._handle.close()
            assert self._tmp_path is not None
            self._tmp_path.unlink(missing_ok=True)
            self._handle = None
        for path in self.paths:
            Path(path).unlink(missing_ok=True)
        self.paths = []
        self._closed = True

    def __enter__(self) -> ShardedJsonlWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _open_shard(self) -> None:
        name = self.shard_name(len(self.paths))
        self._final_path = self.output_dir / name
        self._tmp_path = self.output_dir / (name + ".tmp")
        # The temporary name hides the compression suffix, so pick the codec from the final name.
        self._handle = io.TextIOWrapper(
            _open_binary_as(self._tmp_path, self.compression), encoding="utf-8", newline="\n"
        )
        self._in_shard = 0

    def _finish_shard(self) -> None:
        if self._handle is None:
            return
        self._handle.close()
        assert self._tmp_path is not None and self._final_path is not None
        os.replace(self._tmp_path, self._final_path)
        self.paths.append(str(self._final_path))
        self._handle = None


def _open_binary_as(path: Path, compression: Compression) -> IO[bytes]:
    if compression == "gz":
        # mtime=0 and no embedded file name keep the bytes identical run to run.
        return _OwningGzip(open(path, "wb"))
    if compression == "zst":
        return zstandard.open(path, "wb", cctx=zstandard.ZstdCompressor(level=3))
    return open(path, "wb")
