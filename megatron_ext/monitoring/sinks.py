"""Where metrics go: metrics.jsonl (always), TensorBoard, Weights & Biases.

Only the logging rank builds sinks. ``SinkSet`` calls each sink inside its own guard: the first
failure of a sink is reported once (to stderr and the log) and disables that sink; training goes on.

JSON has no NaN/Infinity, so non-finite floats are written as the strings "nan", "inf", "-inf"
(``read_jsonl`` turns them back into floats).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
LAYER_STATS_FILE = "activation_stats.jsonl"
_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def json_safe(value: Any) -> Any:
    """``value`` with non-finite floats replaced by their string names, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if value != value else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def _restore(value: Any) -> Any:
    if isinstance(value, str) and value in _NONFINITE:
        return _NONFINITE[value]
    if isinstance(value, dict):
        return {k: _restore(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_restore(v) for v in value]
    return value


def read_jsonl(path: str | os.PathLike) -> tuple[list[dict], list[int]]:
    """(records, line numbers of malformed lines) of a metrics file; bad lines are skipped."""
    records, bad = [], []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                bad.append(number)
                continue
            if isinstance(record, dict):
                records.append(_restore(record))
            else:
                bad.append(number)
    return records, bad


def latest_run_records(records: list[dict]) -> list[dict]:
    """The records of a file that a resumed run appended to, as one run. A run writes one record
    per step, in step order, so a record whose ``step`` is not above the one before it starts a
    resumed run, which replaces every earlier record from that step on (the crashed run's steps
    after its last checkpoint were done again)."""
    kept: list[dict] = []
    last = None
    for record in records:
        step = record.get("step")
        if isinstance(step, int) and last is not None and step <= last:
            kept = [r for r in kept if not (isinstance(r.get("step"), int) and r["step"] >= step)]
        if isinstance(step, int):
            last = step
        kept.append(record)
    return kept


def scalar_items(record: dict[str, Any]) -> dict[str, float]:
    """The numeric (int, float, bool) entries of a record, as floats."""
    return {k: float(v) for k, v in record.items() if isinstance(v, (int, float))}


class JsonlSink:
    """One JSON object per line, appended and flushed at once (a crash loses at most a line)."""

    name = "jsonl"

    def __init__(self, run_dir: Path):
        self.metrics = open(run_dir / METRICS_FILE, "a", encoding="utf-8")
        self.layer_stats = open(run_dir / LAYER_STATS_FILE, "a", encoding="utf-8")

    def write(self, step: int, record: dict[str, Any]) -> None:
        self.metrics.write(json.dumps(json_safe(record)) + "\n")
        self.metrics.flush()

    def write_layer_stats(self, step: int, stats: dict[str, Any], flat: dict[str, float]) -> None:
        self.layer_stats.write(json.dumps(json_safe({"step": step, **stats})) + "\n")
        self.layer_stats.flush()

    def close(self) -> None:
        self.metrics.close()
        self.layer_stats.close()


class TensorBoardSink:
    """Scalars under <run_dir>/tensorboard, tagged by record key (``train/loss`` etc.)."""

    name = "tensorboard"

    def __init__(self, run_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        # Flushed every 10 s (TensorBoard's default is 120): a job killed outright (node loss,
        # SIGKILL at the time limit) loses seconds of scalars, not minutes.
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), flush_secs=10)

    def write(self, step: int, record: dict[str, Any]) -> None:
        for key, value in scalar_items(record).items():
            if key != "step":
                self.writer.add_scalar(f"train/{key}", value, step)

    def write_layer_stats(self, step: int, stats: dict[str, Any], flat: dict[str, float]) -> None:
        for key, value in flat.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """The real ``wandb`` library; offline mode writes <run_dir>/wandb/offline-run-* for
    ``wandb sync`` and opens no network connection."""

    name = "wandb"

    def __init__(
        self, run_dir: Path, project: str, run_name: str | None, mode: str, config: dict | None
    ):
        import wandb

        if mode == "offline":
            os.environ["WANDB_MODE"] = "offline"
        os.environ.setdefault("WANDB_SILENT", "true")
        run_dir.mkdir(parents=True, exist_ok=True)
        settings = wandb.Settings(
            silent=True,
            console="off",
            save_code=False,
            disable_git=True,
            x_disable_stats=True,
            x_disable_meta=True,
            x_disable_machine_info=True,
        )
        self.run = wandb.init(
            project=project,
            name=run_name or run_dir.resolve().name,
            dir=str(run_dir),
            mode=mode,
            config=config or {},
            settings=settings,
            reinit="create_new",
        )

    def write(self, step: int, record: dict[str, Any]) -> None:
        values = {f"train/{k}": v for k, v in scalar_items(record).items() if k != "step"}
        self.run.log(values, step=step)

    def write_layer_stats(self, step: int, stats: dict[str, Any], flat: dict[str, float]) -> None:
        self.run.log(flat, step=step)

    def close(self) -> None:
        self.run.finish()


class SinkSet:
    """Fan-out to several sinks; a failing sink is reported once and dropped."""

    def __init__(self) -> None:
        self.sinks: list[Any] = []
        self.failures: dict[str, str] = {}

    def add(self, name: str, factory: Any) -> None:
        """Build a sink with ``factory()``; a failure to build is reported like any other."""
        try:
            self.sinks.append(factory())
        except Exception as error:  # a broken logger must not stop training
            self._report(name, error)

    def write(self, step: int, record: dict[str, Any]) -> None:
        self._call("write", step, record)

    def write_layer_stats(self, step: int, stats: dict[str, Any], flat: dict[str, float]) -> None:
        self._call("write_layer_stats", step, stats, flat)

    def close(self) -> None:
        self._call("close")
        self.sinks = []

    @property
    def names(self) -> list[str]:
        return [sink.name for sink in self.sinks]

    def _call(self, method: str, *args: Any) -> None:
        for sink in list(self.sinks):
            try:
                getattr(sink, method)(*args)
            except Exception as error:  # a broken logger must not stop training
                self.sinks.remove(sink)
                self._report(sink.name, error)

    def _report(self, name: str, error: Exception) -> None:
        message = (
            f"monitoring: the {name} sink failed and is disabled: {type(error).__name__}: {error}"
        )
        self.failures[name] = message
        logger.error(message)
        print(message, file=sys.stderr, flush=True)
