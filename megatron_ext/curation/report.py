"""Per-stage, per-language accounting of documents and bytes, and the curation report.

Every document entering a stage is recorded once under that stage and its language: passed, or
removed with a reason. Bytes are UTF-8 bytes of the text as the stage saw it (in) and left it
(out). The report is written as ``curation_report.json`` plus a readable
``curation_report.txt`` next to the curated shards.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_ext.data.jsonl_io import BadInputReport

STAGES = ("input", "cleaning", "quality", "langid", "exact_dedup", "near_dedup", "perplexity")
REPORT_JSON = "curation_report.json"
REPORT_TEXT = "curation_report.txt"


@dataclass
class StageCounts:
    docs_in: int = 0
    docs_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    removed: dict[str, int] = field(default_factory=dict)

    def add(self, other: StageCounts) -> None:
        self.docs_in += other.docs_in
        self.docs_out += other.docs_out
        self.bytes_in += other.bytes_in
        self.bytes_out += other.bytes_out
        for reason, count in other.removed.items():
            self.removed[reason] = self.removed.get(reason, 0) + count

    def to_dict(self) -> dict[str, Any]:
        return {
            "docs_in": self.docs_in,
            "docs_out": self.docs_out,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "removed": dict(sorted(self.removed.items())),
        }


class CurationStats:
    """stage -> language -> StageCounts."""

    def __init__(self) -> None:
        self.stages: dict[str, dict[str, StageCounts]] = {stage: {} for stage in STAGES}

    def record(
        self,
        stage: str,
        lang: str,
        bytes_in: int,
        bytes_out: int,
        reason: str | None = None,
        count: int = 1,
    ) -> None:
        counts = self.stages[stage].setdefault(lang, StageCounts())
        counts.docs_in += count
        counts.bytes_in += bytes_in
        if reason is None:
            counts.docs_out += count
            counts.bytes_out += bytes_out
        else:
            counts.removed[reason] = counts.removed.get(reason, 0) + count

    def merge(self, other: CurationStats) -> None:
        for stage, per_lang in other.stages.items():
            for lang, counts in per_lang.items():
                self.stages[stage].setdefault(lang, StageCounts()).add(counts)

    def total(self, stage: str) -> StageCounts:
        result = StageCounts()
        for counts in self.stages[stage].values():
            result.add(counts)
        return result

    def to_dict(self) -> dict[str, Any]:
        return {
            stage: {
                "total": self.total(stage).to_dict(),
                "per_language": {
                    lang: counts.to_dict() for lang, counts in sorted(self.stages[stage].items())
                },
            }
            for stage in STAGES
        }


@dataclass
class CurationReport:
    """What a curation run read, removed (and why) and wrote."""

    stats: CurationStats
    bad_input: BadInputReport
    input_files: list[str]
    output_files: list[str]
    workers: int
    elapsed_s: float
    details: dict[str, Any] = field(default_factory=dict)
    """Stage settings worth reading next to the numbers (dedup threshold, perplexity cutoffs)."""
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def docs_read(self) -> int:
        return self.stats.total("input").docs_in

    @property
    def docs_written(self) -> int:
        return self.stats.total("perplexity").docs_out

    def kept_per_language(self) -> dict[str, tuple[int, int]]:
        """language -> (documents, bytes) in the output."""
        return {
            lang: (c.docs_out, c.bytes_out)
            for lang, c in sorted(self.stats.stages["perplexity"].items())
            if c.docs_out
        }

    def to_dict(self) -> dict[str, Any]:
        read_bytes = self.stats.total("input").bytes_in
        return {
            "input_files": self.input_files,
            "output_files": self.output_files,
            "docs_read": self.docs_read,
            "docs_written": self.docs_written,
            "workers": self.workers,
            "elapsed_s": round(self.elapsed_s, 3),
            "docs_per_s": round(self.docs_read / self.elapsed_s, 1) if self.elapsed_s else None,
            "mb_per_s": round(read_bytes / 1e6 / self.elapsed_s, 3) if self.elapsed_s else None,
            "stages": self.stats.to_dict(),
            "bad_input": self.bad_input.to_dict(),
            "details": self.details,
            "config": self.config,
        }

    def summary(self) -> str:
        lines = [
            f"curation: read {self.docs_read} documents from {len(self.input_files)} file(s), "
            f"wrote {self.docs_written} to {len(self.output_files)} shard(s) "
            f"in {self.elapsed_s:.1f} s with {self.workers} worker(s)",
            "",
            f"{'stage':<12} {'docs in':>10} {'docs out':>10} {'MB in':>9} {'MB out':>9}  removed",
        ]
        for stage in STAGES:
            t = self.stats.total(stage)
            removed = ", ".join(f"{r}={n}" for r, n in sorted(t.removed.items())) or "-"
            lines.append(
                f"{stage:<12} {t.docs_in:>10} {t.docs_out:>10} {t.bytes_in / 1e6:>9.3f} "
                f"{t.bytes_out / 1e6:>9.3f}  {removed}"
            )
        lines += ["", "kept per language (documents, bytes):"]
        kept = self.kept_per_language()
        lines += [f"  {lang}: {docs} docs, {size} bytes" for lang, (docs, size) in kept.items()]
        if not kept:
            lines.append("  (none)")
        lines += ["", self.bad_input.summary()]
        return "\n".join(lines)

    def write(self, output_dir: str | os.PathLike) -> tuple[Path, Path]:
        """Write the JSON and text reports atomically; returns their paths."""
        output_dir = Path(output_dir)
        paths = (output_dir / REPORT_JSON, output_dir / REPORT_TEXT)
        contents = (json.dumps(self.to_dict(), indent=2, ensure_ascii=False), self.summary())
        for path, text in zip(paths, contents):
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(text + "\n", encoding="utf-8")
            os.replace(tmp, path)
        return paths
