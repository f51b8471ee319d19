"""``python -m megatron_ext.train --dry-run``: readable figures at any model size, and a hint at
``--world-size`` where the layout does not fit the one process it planned for."""

from __future__ import annotations

from pathlib import Path

from megatron_ext.train import main

CONFIGS = Path(__file__).resolve().parents[3] / "examples" / "configs"


def test_layout_problem_on_one_process_points_at_world_size(monkeypatch, capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["--config", str(CONFIGS / "recipe_7b.yaml"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "parallel.tensor_model_parallel_size" in err and "--world-size N" in err
    # Another mistake gets no such hint; with the cluster's size the plan is printed.
    assert main(["--config", str(CONFIGS / "tiny_cpu.yaml"), "--dry-run", "--model.x=1"]) == 2
    assert "--world-size" not in capsys.readouterr().err
    argv = ["--config", str(CONFIGS / "recipe_7b.yaml"), "--dry-run", "--world-size", "128"]
    assert main(argv) == 0
    assert "memory/GPU ~" in capsys.readouterr().out


def test_small_models_get_small_units(monkeypatch, capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["--config", str(CONFIGS / "tiny_cpu.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "0.000B" not in out and "~0.0 GiB" not in out
    assert "K params/GPU" in out and "MiB" in out
