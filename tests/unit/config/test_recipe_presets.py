"""The shipped recipe presets (``examples/configs/recipe_{1b,7b,70b}.yaml``) against the recipe.

Each preset must carry the published recipe's settings, validate on the world size its header
documents, keep the global batch through gradient accumulation at both ends of the curriculum,
have the size its header claims, and fit an 80 GB card by the dry run's estimate (checked against
the built model in ``tests/distributed/test_estimate_vs_model.py`` and on the GPU in
``docs/performance.md``).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from megatron_ext.config.loader import load_config
from megatron_ext.parallel.layout import ParallelLayout
from megatron_ext.train import dry_run_report
from megatron_ext.training.estimate import estimate_stages, total_params
from megatron_ext.training.experiment import ExperimentConfig
from megatron_ext.training.schedules import curriculum_lengths, step_global_batch_size

CONFIGS = Path(__file__).resolve().parents[3] / "examples" / "configs"
PRESETS = ["recipe_1b.yaml", "recipe_7b.yaml", "recipe_70b.yaml"]
USABLE_GIB = 70.0  # of an 80 GB H100's 79.1 GiB, leaving room for the allocator and workspaces


def _header(name: str) -> tuple[float, int]:
    """(the 'about N B parameters' claim, the documented dry-run world size)."""
    text = (CONFIGS / name).read_text()
    size = re.search(r"^# The recipe at about ([\d.]+)B parameters", text, re.MULTILINE)
    world = re.search(r"--dry-run --world-size (\d+)", text)
    assert size and world, f"{name}: header lacks its size or its dry-run command"
    return float(size.group(1)), int(world.group(1))


@pytest.mark.parametrize("name", PRESETS)
def test_preset_carries_the_recipe(name):
    cfg = load_config(ExperimentConfig, str(CONFIGS / name), [])
    assert cfg.model.vocab_size == 65536
    assert cfg.model.seq_length == cfg.schedule.seq_length == 8192
    assert cfg.schedule.global_batch_size == 2048
    curriculum = cfg.schedule.curriculum
    assert curriculum.enabled and curriculum.start_seq_length == 2048
    assert curriculum.fraction == 0.1
    assert cfg.schedule.lr_warmup_steps == 5000
    assert cfg.schedule.lr_decay_style == "cosine" and cfg.schedule.min_lr_ratio == 0.1
    assert (cfg.optimizer.adam_beta1, cfg.optimizer.adam_beta2) == (0.9, 0.95)
    assert cfg.optimizer.weight_decay == 0.1
    assert cfg.checkpoint.interval == 1000
    assert cfg.precision.dtype == "bf16"


@pytest.mark.parametrize("name", PRESETS)
def test_preset_plans_on_its_documented_cluster(name):
    about, world = _header(name)
    cfg = load_config(ExperimentConfig, str(CONFIGS / name), [])
    report = dry_run_report(cfg, world)  # validates; raises ConfigError otherwise
    layout = ParallelLayout.from_config(cfg.parallel, world)
    assert f"on {world} processes" in report
    sched = cfg.schedule
    lengths = curriculum_lengths(sched)
    assert (lengths[0], lengths[-1]) == (2048, 8192)
    for length in (lengths[0], lengths[-1]):
        assert step_global_batch_size(sched, length, layout.dp) == 2048
        assert 2048 % (sched.micro_batch_size * layout.dp) == 0
    tp = cfg.parallel.tensor_model_parallel_size
    assert total_params(cfg.model, tp) / 1e9 == pytest.approx(about, rel=0.1)
    stages = estimate_stages(
        cfg.model, cfg.parallel, cfg.precision, world, sched.micro_batch_size, sched.seq_length
    )
    assert max(stage.total_gib for stage in stages) < USABLE_GIB


def test_full_recompute_estimate_follows_method_group_size_and_sequence_parallel():
    """Full recomputation keeps one (sequence-parallel) input per group; block keeps the rest of
    each chunk's layers whole."""

    def first_stage_activations(*overrides: str) -> float:
        cfg = load_config(ExperimentConfig, CONFIGS / "recipe_70b.yaml", list(overrides))
        stage = estimate_stages(
            cfg.model, cfg.parallel, cfg.precision, 512, cfg.schedule.micro_batch_size, 8192
        )[0]
        return stage.activations_gib

    uniform = first_stage_activations()
    without_sp = first_stage_activations("--parallel.sequence_parallel=false")
    block = first_stage_activations("--model.recompute_method=block")
    whole_chunk = first_stage_activations(
        "--model.recompute_method=block", "--model.recompute_num_layers=4"
    )
    none = first_stage_activations("--model.recompute_granularity=none")
    assert uniform < without_sp < block < none
    assert whole_chunk == pytest.approx(uniform)  # every layer of a 4-layer chunk checkpointed
