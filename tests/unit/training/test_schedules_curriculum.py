"""Sequence-length curriculum, batch size per step and exact token accounting."""

from __future__ import annotations

import pytest

from megatron_ext.config.errors import ConfigError
from megatron_ext.config.loader import load_config
from megatron_ext.training.schedule_config import CurriculumConfig, ScheduleConfig
from megatron_ext.training.schedules import (
    TrainProgress,
    advance,
    check_schedule,
    curriculum_lengths,
    curriculum_seq_length,
    iter_step_plans,
    plan_step,
    planned_tokens,
)

pytestmark = pytest.mark.timeout(120)


def _recipe(mode: str = "sequences", **overrides) -> ScheduleConfig:
    curriculum = CurriculumConfig(
        start_seq_length=2048, fraction=0.1, multiple=256, mode=mode, batch_multiple=64
    )
    values = dict(
        seq_length=8192,
        global_batch_size=2048,
        micro_batch_size=1,
        train_steps=100_000,
        lr_warmup_steps=5000,
        curriculum=curriculum,
    )
    values.update(overrides)
    return ScheduleConfig(**values)


def test_lengths_at_chosen_steps():
    cfg = _recipe()
    expected = {0: 2048, 1000: 2560, 1250: 2816, 5000: 5120, 9999: 7936, 10_000: 8192, 99_999: 8192}
    for step, length in expected.items():
        assert curriculum_seq_length(cfg, step) == length, step
    lengths = [curriculum_seq_length(cfg, s) for s in range(0, 10_001, 7)]
    assert lengths == sorted(lengths) and all(x % 256 == 0 for x in lengths)
    assert curriculum_lengths(cfg) == list(range(2048, 8193, 256))
    cfg.curriculum.enabled = False
    assert curriculum_seq_length(cfg, 0) == 8192


def test_tokens_per_step_in_both_modes():
    sequences = _recipe("sequences")
    tokens = _recipe("tokens")
    for step, length in ((0, 2048), (1000, 2560), (5000, 5120), (20_000, 8192)):
        progress = TrainProgress(step=step)
        plan_s = plan_step(sequences, progress, data_parallel_size=64)
        plan_t = plan_step(tokens, progress, data_parallel_size=64)
        assert plan_s.seq_length == plan_t.seq_length == length
        assert (plan_s.global_batch_size, plan_s.num_tokens) == (2048, 2048 * length)
        # tokens mode: 2048 * 8192 tokens per step, rounded down to 64 sequences.
        assert plan_t.global_batch_size == (2**24 // length) // 64 * 64
        assert 2**24 - 64 * length < plan_t.num_tokens <= 2**24
        assert plan_t.num_microbatches == plan_t.global_batch_size // 64
    assert plan_step(tokens, TrainProgress(), 64).global_batch_size == 8192
    assert plan_step(tokens, TrainProgress(step=1000), 64).num_tokens == 6528 * 2560


def test_token_based_curriculum_follows_consumed_tokens():
    total = 100_000 * 2**24
    cfg = _recipe(unit="tokens", train_tokens=total, lr_warmup_tokens=5000 * 2**24)
    assert curriculum_seq_length(cfg, step=0, consumed_tokens=0) == 2048
    assert curriculum_seq_length(cfg, step=0, consumed_tokens=total // 20) == 5120
    assert curriculum_seq_length(cfg, step=10**6, consumed_tokens=total // 10) == 8192


@pytest.mark.parametrize("mode", ["sequences", "tokens"])
@pytest.mark.parametrize("unit", ["steps", "tokens"])
def test_exact_accounting_over_a_whole_run(mode, unit):
    cfg = ScheduleConfig(
        seq_length=128,
        global_batch_size=8,
        micro_batch_size=2,
        train_steps=50,
        unit=unit,
        train_tokens=50 * 1024,
        lr_warmup_tokens=1024,
        curriculum=CurriculumConfig(start_seq_length=32, fraction=0.4, multiple=32, mode=mode),
    )
    check_schedule(cfg, data_parallel_size=2)
    progress, tokens, samples, lengths = TrainProgress(), 0, 0, []
    for plan in iter_step_plans(cfg, progress, data_parallel_size=2):
        assert plan.consumed_tokens == tokens and plan.consumed_samples == samples
        assert plan.global_batch_size == plan.num_microbatches * 2 * 2
        tokens += plan.global_batch_size * plan.seq_length
        samples += plan.global_batch_size
        lengths.append(plan.seq_length)
        progress = advance(progress, plan)
    assert (progress.consumed_tokens, progress.consumed_samples) == (tokens, samples)
    assert planned_tokens(cfg, data_parallel_size=2) == tokens + 1  # + the last label token
    assert lengths[0] == 32 and lengths[-1] == 128 and lengths == sorted(lengths)
    if unit == "steps":
        assert progress.step == 50
    else:
        assert tokens >= 50 * 1024


def test_batch_errors_name_field_value_and_fix():
    with pytest.raises(ConfigError) as info:
        check_schedule(_recipe(micro_batch_size=3), data_parallel_size=8)
    assert info.value.fields() == ["schedule.global_batch_size"]
    assert "3*8=24" in str(info.value) and "2040, 2064" in str(info.value)
    with pytest.raises(ConfigError) as info:
        check_schedule(_recipe("tokens"), data_parallel_size=128)
    assert info.value.fields() == ["schedule.curriculum.batch_multiple"]
    assert "multiple of 128" in str(info.value)
    tokens_auto = _recipe("tokens", micro_batch_size=3)
    tokens_auto.curriculum.batch_multiple = None
    with pytest.raises(ConfigError, match="multiple of 24") as info:
        check_schedule(tokens_auto, data_parallel_size=8)
    assert info.value.fields() == ["schedule.global_batch_size"]
    check_schedule(_recipe("tokens"), data_parallel_size=64)
    check_schedule(_recipe(), data_parallel_size=2048)


def test_config_problems_are_collected(tmp_path):
    path = tmp_path / "schedule.yaml"
    path.write_text(
        "seq_length: 8192\nunit: tokens\nlr_warmup_steps: 10\n"
        "curriculum: {start_seq_length: 16384, multiple: 0}\n"
    )
    cfg = load_config(ScheduleConfig, path)
    with pytest.raises(ConfigError) as info:
        check_schedule(cfg, data_parallel_size=1)
    assert set(info.value.fields()) == {
        "schedule.train_tokens",
        "schedule.curriculum.start_seq_length",
        "schedule.curriculum.multiple",
    }
    assert "set schedule.train_tokens" in str(info.value)
