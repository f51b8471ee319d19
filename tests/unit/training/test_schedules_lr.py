"""Learning-rate schedule: closed form vs megatron-core's OptimizerParamScheduler."""

from __future__ import annotations

import pytest
import torch
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_ext.training.schedule_config import CurriculumConfig, ScheduleConfig
from megatron_ext.training.schedules import (
    TrainProgress,
    advance,
    iter_step_plans,
    lr_at,
    megatron_scheduler_kwargs,
    scheduler_increment,
)

pytestmark = pytest.mark.timeout(120)

PEAK = 3.0e-4


def _recipe(**overrides) -> ScheduleConfig:
    values = dict(
        seq_length=8192,
        global_batch_size=2048,
        micro_batch_size=1,
        train_steps=50_000,
        lr=PEAK,
        min_lr_ratio=0.1,
        lr_warmup_steps=5000,
        lr_decay_style="cosine",
        curriculum=CurriculumConfig(start_seq_length=2048, fraction=0.1, multiple=256),
    )
    values.update(overrides)
    return ScheduleConfig(**values)


def _megatron_scheduler(cfg: ScheduleConfig) -> OptimizerParamScheduler:
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1.0)
    return OptimizerParamScheduler(optimizer, **megatron_scheduler_kwargs(cfg, weight_decay=0.1))


def test_closed_form_at_the_recipe_milestones():
    cfg = _recipe()
    assert lr_at(cfg, 0) == 0.0
    assert lr_at(cfg, 2500) == pytest.approx(PEAK / 2, rel=1e-12)
    assert lr_at(cfg, 5000) == pytest.approx(PEAK, rel=1e-12)
    mid = 5000 + (50_000 - 5000) // 2
    assert lr_at(cfg, mid) == pytest.approx(0.1 * PEAK + 0.5 * 0.9 * PEAK, rel=1e-12)
    assert lr_at(cfg, 50_000) == pytest.approx(0.1 * PEAK, rel=1e-12)
    assert lr_at(cfg, 60_000) == pytest.approx(0.1 * PEAK, rel=1e-12)
    assert lr_at(cfg, 49_999) > lr_at(cfg, 50_000)
    assert all(lr_at(cfg, s) >= lr_at(cfg, s + 1000) for s in range(5000, 50_000, 1000))


@pytest.mark.parametrize("style", ["cosine", "linear"])
def test_megatron_scheduler_agrees_with_closed_form(style):
    cfg = _recipe(lr_decay_style=style)
    scheduler = _megatron_scheduler(cfg)
    group = scheduler.optimizer.param_groups[0]
    done = 0
    for step in (0, 2500, 5000, 27_500, 49_999, 50_000, 50_001):
        scheduler.step(increment=step - done)
        done = step
        assert group["lr"] == pytest.approx(lr_at(cfg, step), rel=1e-12, abs=1e-18), step
        assert group["weight_decay"] == pytest.approx(0.1)


def test_megatron_scheduler_agrees_at_every_step_of_a_small_run():
    cfg = _recipe(train_steps=60, lr_warmup_steps=7, lr_warmup_init=1e-5)
    scheduler = _megatron_scheduler(cfg)
    for plan in iter_step_plans(cfg, TrainProgress(), data_parallel_size=1):
        assert scheduler.optimizer.param_groups[0]["lr"] == pytest.approx(plan.lr, rel=1e-12)
        assert plan.lr == lr_at(cfg, plan.step)
        scheduler.step(increment=scheduler_increment(cfg, plan))
    assert plan.step == 59


def test_token_unit_schedule_with_megatron_scheduler():
    # Curriculum run measured in tokens: steps differ in size, the LR follows tokens.
    cfg = _recipe(
        seq_length=64,
        global_batch_size=8,
        train_steps=1,
        unit="tokens",
        train_tokens=40 * 512,
        lr_warmup_tokens=5 * 512,
        curriculum=CurriculumConfig(start_seq_length=16, fraction=0.5, multiple=16),
    )
    scheduler = _megatron_scheduler(cfg)
    progress = TrainProgress()
    plans = []
    for plan in iter_step_plans(cfg, progress, data_parallel_size=1):
        plans.append(plan)
        assert scheduler.optimizer.param_groups[0]["lr"] == pytest.approx(plan.lr, rel=1e-12)
        scheduler.step(increment=scheduler_increment(cfg, plan))
        progress = advance(progress, plan)
    assert len({p.num_tokens for p in plans}) > 1  # the curriculum changed the step size
    assert progress.consumed_tokens >= 40 * 512 > plans[-1].consumed_tokens
    assert scheduler.optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * PEAK)
    # Warmup ends after lr_warmup_tokens tokens: 20 steps of 8 x 16 tokens, not 5 steps.
    peak_plan = next(p for p in plans if p.lr == pytest.approx(PEAK))
    assert (peak_plan.step, peak_plan.consumed_tokens, peak_plan.seq_length) == (20, 2560, 16)
