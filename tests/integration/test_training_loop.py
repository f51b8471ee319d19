"""The training loop end to end on CPU processes: batch arithmetic, fp16 loss scaling, the recipe.

Each test runs ``megatron_ext.training.loop.train`` on spawned gloo processes over a token dataset
written here, and reads back ``metrics.jsonl``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from megatron_ext.parallel.local_launch import run_on_local_processes

VOCAB = 256  # tests/conftest.py: token_dataset


def _overrides(dataset: str, run_dir: Path, extra: list[str]) -> list[str]:
    return [
        f"--run_dir={run_dir}",
        f"--data.data_path=[{dataset}]",
        "--data.eod_token_id=2",
        f"--model.vocab_size={VOCAB}",
        "--model.make_vocab_size_divisible_by=64",
        "--model.seq_length=64",
        "--parallel.device=cpu",
        "--schedule.seq_length=64",
        "--schedule.lr_warmup_steps=2",
        "--training.eval_interval=0",
        "--monitoring.tensorboard=false",
        "--monitoring.wandb=false",
        "--monitoring.activation_stats_interval=0",
        "--checkpoint.interval=0",
        "--checkpoint.save_on_exit=false",
        *extra,
    ]


def _run(rank: int, overrides: list[str], config_path: str | None):
    from megatron_ext.config.loader import load_config
    from megatron_ext.training.experiment import ExperimentConfig
    from megatron_ext.training.loop import train

    cfg = load_config(ExperimentConfig, config_path, overrides)
    return train(cfg).__dict__


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_dp1_with_4_microbatches_equals_dp4_with_1(token_dataset, tmp_path):
    runs = {}
    for world in (1, 4):
        run_dir = tmp_path / f"dp{world}"
        extra = [
            "--schedule.global_batch_size=4",
            "--schedule.micro_batch_size=1",
            "--schedule.train_steps=6",
            "--schedule.curriculum.start_seq_length=32",
            "--schedule.curriculum.fraction=0.5",
            "--schedule.curriculum.multiple=16",
        ]
        if world == 4:  # the four ranks share one memory-mapped data index
            extra.append(f"--data.index_cache_dir={tmp_path / 'index_cache'}")
        run_on_local_processes(_run, world, _overrides(token_dataset, run_dir, extra), None)
        runs[world] = _metrics(run_dir)
    one, four = runs[1], runs[4]
    # The DP4 run read its index from files the four ranks wrote once, with nothing left over.
    names = sorted(p.name for p in (tmp_path / "index_cache").iterdir())
    assert [n.split("-")[0] for n in names].count("split") == 1, names
    assert any(n.startswith("epoch-") for n in names), names
    assert not [n for n in names if n.startswith(".tmp-") or n.endswith(".building")], names
    assert [r["num_microbatches"] for r in one] == [4] * 6
    assert [r["num_microbatches"] for r in four] == [1] * 6
    assert [r["seq_length"] for r in one] == [r["seq_length"] for r in four]
    assert len({r["seq_length"] for r in one}) > 1, "the curriculum changes the length"
    for row in one + four:
        assert row["loss_scale"] == 1.0  # fp32: no scaler
        # The step's split: forward/backward, then the rest of the step (norm, update).
        assert row["forward_backward_ms"] > 0 and row["optimizer_ms"] >= 0
        assert row["forward_backward_ms"] + row["optimizer_ms"] <= row["step_time_ms"]
    for a, b in zip(one, four):
        assert a["consumed_tokens"] == b["consumed_tokens"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)


def test_fp16_overflow_skips_step_halves_scale_and_continues(token_dataset, tmp_path):
    run_dir = tmp_path / "fp16"
    extra = [
        "--precision.dtype=fp16",
        "--precision.initial_loss_scale=16777216",  # 2^24: the first backward overflows fp16
        "--precision.hysteresis=1",
        "--schedule.global_batch_size=4",
        "--schedule.micro_batch_size=2",
        "--schedule.train_steps=10",
        "--schedule.curriculum.enabled=false",
    ]
    run_on_local_processes(_run, 1, _overrides(token_dataset, run_dir, extra), None)
    rows = _metrics(run_dir)
    assert rows[0]["skipped"] is True
    assert rows[1]["loss_scale"] == rows[0]["loss_scale"] / 2
    first_applied = next(i for i, r in enumerate(rows) if not r["skipped"])
    assert all(r["skipped"] for r in rows[:first_applied])
    for before, after in zip(rows[: first_applied - 1], rows[1:first_applied]):
        assert after["loss_scale"] == before["loss_scale"] / 2
    assert not any(r["skipped"] for r in rows[first_applied:])
    assert all(np.isfinite(r["loss"]) for r in rows)
    # Skipped steps consume their data like any other (the position never depends on overflows).
    assert rows[-1]["consumed_tokens"] == 10 * 4 * 64


def test_an_evaluation_after_an_overflow_step_is_not_in_its_activation_statistics(
    token_dataset, tmp_path
):
    """An fp16 overflow skips the update gate, which is where the activation hooks came off: the
    evaluation that followed was counted into the step's statistics."""
    stats = {}
    for eval_interval in (1, 0):  # an evaluation right after step 1, or none before the end
        run_dir = tmp_path / f"eval_{eval_interval}"
        extra = [
            "--precision.dtype=fp16",
            "--precision.initial_loss_scale=16777216",  # the first backward overflows
            "--schedule.global_batch_size=4",
            "--schedule.micro_batch_size=2",
            "--schedule.train_steps=3",
            "--schedule.curriculum.enabled=false",
            "--data.split=80,20",
            "--training.eval_iters=1",
            f"--training.eval_interval={eval_interval}",
            "--monitoring.activation_stats_interval=1",
        ]
        run_on_local_processes(_run, 1, _overrides(token_dataset, run_dir, extra), None)
        assert _metrics(run_dir)[0]["skipped"] is True
        lines = (run_dir / "activation_stats.jsonl").read_text().splitlines()
        stats[eval_interval] = json.loads(lines[0])
    assert stats[1]["step"] == stats[0]["step"] == 1
    assert stats[1]["layers"] == stats[0]["layers"]


def test_recipe_at_reduced_size_runs_with_every_feature(token_dataset, tmp_path):
    """recipe_1b.yaml with a tiny model on 4 CPU processes: TP2 x DP2, sequence parallel, bf16,
    distributed optimizer with the overlapped gradient reduce and weight all-gather, the
    preset's two loader threads, curriculum, warmup + cosine, evaluation, checkpoint,
    monitoring."""
    run_dir = tmp_path / "recipe"
    extra = [
        "--model.num_layers=2",
        "--model.hidden_size=64",
        "--model.ffn_hidden_size=128",
        "--model.num_attention_heads=4",
        "--model.num_query_groups=2",
        "--parallel.tensor_model_parallel_size=2",
        "--parallel.sequence_parallel=true",
        "--schedule.global_batch_size=8",
        "--schedule.micro_batch_size=2",
        "--schedule.train_steps=4",
        "--schedule.curriculum.start_seq_length=32",
        "--schedule.curriculum.multiple=16",
        "--schedule.curriculum.fraction=0.5",
        "--tokenizer.tokenizer_type=none",
        "--training.eval_interval=2",
        "--training.eval_iters=1",
        "--data.split=90,10",
        f"--data.index_cache_dir={tmp_path / 'index_cache'}",
        "--monitoring.activation_stats_interval=2",
        "--checkpoint.interval=2",
        "--checkpoint.save_on_exit=true",
    ]
    # The recipe file's own model/parallel values are overridden; everything else stays.
    overrides = _overrides(token_dataset, run_dir, extra)
    overrides = [o for o in overrides if not o.startswith("--model.vocab_size")]
    overrides.append(f"--model.vocab_size={VOCAB}")
    summaries = run_on_local_processes(
        _run, 4, overrides, str(Path(__file__).parents[2] / "examples/configs/recipe_1b.yaml")
    )
    rows = _metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[0]["seq_length"] < rows[-1]["seq_length"] == 64
    assert all(r["global_batch_size"] == 8 for r in rows)
    assert rows[0]["lr"] == 0.0 and rows[1]["lr"] > 0
    assert any(r.get("val_loss") is not None for r in rows)
    assert summaries[0]["stopped_by"] == "done"
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("iter_*")) == [
        "iter_0000002",
        "iter_0000004",
    ]


def _run_catching_config_errors(rank: int, overrides: list[str]):
    from megatron_ext.config.errors import ConfigError

    try:
        return {"summary": _run(rank, overrides, None)}
    except ConfigError as error:
        return {"fields": error.fields(), "message": str(error)}


def test_a_tokenizer_problem_stops_every_rank_before_anything_is_written(token_dataset, tmp_path):
    # Rank 0 reads the tokenizer; rank 1 stops with the same problem instead of waiting for it.
    run_dir = tmp_path / "run"
    extra = [
        "--tokenizer.tokenizer_type=SentencePieceTokenizer",
        f"--tokenizer.tokenizer_model={tmp_path / 'no_tokenizer_here'}",
        "--schedule.global_batch_size=2",
        "--schedule.micro_batch_size=1",
        "--schedule.train_steps=4",
    ]
    outcomes = run_on_local_processes(
        _run_catching_config_errors, 2, _overrides(token_dataset, run_dir, extra)
    )
    assert [o.get("fields") for o in outcomes] == [["tokenizer.tokenizer_model"]] * 2
    assert "no model file" in outcomes[1]["message"]
    assert not run_dir.exists()
