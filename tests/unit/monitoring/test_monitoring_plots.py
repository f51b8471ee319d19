"""tools/plot_run.py on a run directory made here (synthetic metrics of a 6-layer model)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from megatron_ext.monitoring.activations import SITES

ROOT = Path(__file__).resolve().parents[3]


def _tool():
    spec = importlib.util.spec_from_file_location("plot_run", ROOT / "tools" / "plot_run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _make_run(run_dir: Path, num_layers: int = 6, steps: int = 60) -> None:
    run_dir.mkdir()
    with open(run_dir / "metrics.jsonl", "w") as metrics:
        for step in range(1, steps + 1):
            record = {
                "step": step,
                "loss": 8.0 * math.exp(-step / 30) + 2.0,
                "grad_norm": 1.0 + 0.1 * math.sin(step),
                "lr": 3e-4 * min(1.0, step / 10),
                "seq_length": 64 if step < 30 else 128,
                "tokens_per_s": 1.0e5 + 100 * step,
                "tflops_per_gpu": 300.0,
                "mfu": 0.3,
                "param_norm": 100.0 + step / 10,
                "step_time_ms": 500.0,
                "data_wait_ms": 5.0,
                "skipped": step == 40,
            }
            if step % 10 == 0:
                record["val_loss"] = record["loss"] + 0.1
                record["update_to_weight"] = 1e-3
            metrics.write(json.dumps(record) + "\n")
        metrics.write("{broken\n")
    with open(run_dir / "activation_stats.jsonl", "w") as layers:
        for step in range(5, steps + 1, 5):
            entry = [
                {
                    "layer": i,
                    **{
                        site: {"rms": 0.5 + i + step / 100, "abs_max": 10.0 * (i + 1)}
                        for site in SITES
                    },
                    "grad_norm": 0.1 * (i + 1),
                }
                for i in range(num_layers)
            ]
            layers.write(json.dumps({"step": step, "layers": entry}) + "\n")


def test_plot_run_writes_both_dashboards(tmp_path, capsys):
    _make_run(tmp_path / "run")
    assert _tool().main([str(tmp_path / "run")]) == 0
    out = capsys.readouterr()
    assert "skipped 1 malformed line(s) of metrics.jsonl: 61" in out.err
    for name in ("dashboard.png", "layers.png"):
        path = tmp_path / "run" / "plots" / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 20_000


def test_plot_run_without_layer_stats_and_bad_dirs(tmp_path, capsys):
    _make_run(tmp_path / "run")
    (tmp_path / "run" / "activation_stats.jsonl").unlink()
    assert _tool().main([str(tmp_path / "run"), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "dashboard.png").exists()
    assert not (tmp_path / "out" / "layers.png").exists()
    assert "no per-layer statistics" in capsys.readouterr().out
    assert _tool().main([str(tmp_path / "missing")]) == 2
    assert "metrics.jsonl does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("content", ["", "{}\n"])
def test_plot_run_rejects_empty_metrics(tmp_path, content):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text(content)
    assert _tool().main([str(tmp_path / "run")]) == 2
