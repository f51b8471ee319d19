"""metrics.jsonl round trip, sink failure isolation, the wandb file reader's error handling."""

from __future__ import annotations

import json
import math
import struct
import zlib

import pytest

from megatron_ext.monitoring.sinks import (
    METRICS_FILE,
    JsonlSink,
    SinkSet,
    TensorBoardSink,
    read_jsonl,
)
from megatron_ext.monitoring.wandb_offline import WandbFileError, iter_records


def test_jsonl_round_trip_with_nonfinite_values(tmp_path):
    sink = JsonlSink(tmp_path)
    sink.write(1, {"step": 1, "loss": math.nan, "grad_norm": math.inf, "lr": 1e-3, "skipped": True})
    sink.write(2, {"step": 2, "loss": 2.5, "nested": [-math.inf, 1.0]})
    sink.close()
    lines = (tmp_path / METRICS_FILE).read_text().splitlines()
    assert all(json.loads(line) for line in lines)  # strict JSON, no NaN tokens
    with open(tmp_path / METRICS_FILE, "a") as handle:
        handle.write("{not json\n[1, 2]\n")
    records, bad = read_jsonl(tmp_path / METRICS_FILE)
    assert bad == [3, 4]
    assert math.isnan(records[0]["loss"]) and records[0]["grad_norm"] == math.inf
    assert records[1]["nested"] == [-math.inf, 1.0] and records[0]["skipped"] is True


def test_failing_sink_is_reported_once_and_dropped(tmp_path, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    broken, healthy = JsonlSink(tmp_path / "a"), JsonlSink(tmp_path / "b")
    broken.metrics.close()  # every later write raises ValueError: I/O on a closed file
    sinks = SinkSet()
    sinks.sinks = [broken, healthy]
    for step in range(3):
        sinks.write(step, {"step": step})
    assert sinks.names == ["jsonl"]
    assert len((tmp_path / "b" / METRICS_FILE).read_text().splitlines()) == 3
    err = capsys.readouterr().err
    assert err.count("the jsonl sink failed and is disabled: ValueError") == 1
    # A sink that cannot even be built (its directory is a file) is reported the same way.
    (tmp_path / "not_a_dir").write_text("x")
    sinks.add("tensorboard", lambda: TensorBoardSink(tmp_path / "not_a_dir"))
    assert "tensorboard" in sinks.failures and sinks.names == ["jsonl"]
    sinks.close()


def _frame(kind: int, body: bytes) -> bytes:
    return (
        struct.pack("<IHB", zlib.crc32(bytes([kind]) + body) & 0xFFFFFFFF, len(body), kind) + body
    )


def test_wandb_reader_framing(tmp_path):
    header = b":W&B" + struct.pack("<H", 0xBEE1) + b"\x00"
    path = tmp_path / "run-x.wandb"
    path.write_bytes(header + _frame(1, b"abc") + _frame(2, b"de") + _frame(4, b"f"))
    assert iter_records(path) == [b"abc", b"def"]
    corrupted = bytearray(path.read_bytes())
    corrupted[len(header) + 7] ^= 0xFF
    path.write_bytes(bytes(corrupted))
    with pytest.raises(WandbFileError, match="checksum"):
        iter_records(path)
    path.write_bytes(b"not a wandb file")
    with pytest.raises(WandbFileError, match="header"):
        iter_records(path)


def test_a_resumed_run_replaces_the_steps_it_did_again():
    from megatron_ext.monitoring.sinks import latest_run_records

    crashed = [{"step": s, "loss": 10.0 - s} for s in range(1, 8)]
    resumed = [{"step": s, "loss": 20.0 - s} for s in range(6, 10)]
    records = latest_run_records(crashed + resumed)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert [r.get("loss") for r in records if r["step"] >= 6] == [14.0, 13.0, 12.0, 11.0]
    # A crash one logged step after the checkpoint: the resumed run starts at the last step.
    records = latest_run_records(crashed[:6] + resumed)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6, 7, 8, 9]
    # A second crash and resume behind the first one's resume point.
    again = latest_run_records(crashed + resumed + [{"step": 3, "loss": 0.0}])
    assert [r["step"] for r in again] == [1, 2, 3] and again[-1]["loss"] == 0.0
