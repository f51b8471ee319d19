"""Exact resume: a restored data state gives the batches the uninterrupted run would have read,
on another data-parallel layout too (megatron_ext.data + training.schedules)."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from megatron_ext.data.config import DataConfig
from megatron_ext.data.prefetch import BatchPrefetcher, make_step_loader
from megatron_ext.data.token_stream import build_token_streams
from megatron_ext.training.schedule_config import CurriculumConfig, ScheduleConfig
from megatron_ext.training.schedules import (
    TrainProgress,
    advance,
    iter_step_plans,
    progress_state_dict,
    restore_progress,
)

pytestmark = pytest.mark.timeout(120)


def _schedule(unit: str) -> ScheduleConfig:
    curriculum = CurriculumConfig(
        start_seq_length=16, fraction=0.5, multiple=16, mode="tokens", batch_multiple=4
    )
    return ScheduleConfig(
        seq_length=64,
        global_batch_size=8,
        micro_batch_size=1,
        train_steps=30,
        lr_warmup_steps=4,
        unit=unit,
        train_tokens=30 * 512 if unit == "tokens" else None,
        lr_warmup_tokens=4 * 512 if unit == "tokens" else None,
        curriculum=curriculum,
    )


def _run(data_config, cfg, progress, dp_size, stop_at=None):
    """Global batches (all ranks gathered) of each step from ``progress`` on."""
    stream = build_token_streams(data_config).train  # fresh objects, as after a restart
    loaders = [
        make_step_loader(stream, dp_rank=r, dp_size=dp_size, micro_batch_size=cfg.micro_batch_size)
        for r in range(dp_size)
    ]
    plans = list(iter_step_plans(cfg, progress, dp_size))
    batches = []
    with BatchPrefetcher(loaders[0], [p.request for p in plans], num_workers=1) as prefetcher:
        for plan in plans:
            if stop_at is not None and plan.step == stop_at:
                break
            rank0 = prefetcher.next()
            assert rank0.request == plan.request
            micro = list(rank0.micro_batches)
            for load in loaders[1:]:
                micro += load(plan.request)
            assert len(micro) == plan.num_microbatches * dp_size
            batches.append(torch.cat([mb["tokens"] for mb in micro]))
            progress = advance(progress, plan)
    return batches, progress


@pytest.mark.parametrize("unit", ["steps", "tokens"])
def test_resume_on_another_layout_reads_the_same_batches(two_datasets, unit):
    prefix_a, prefix_b, _, _ = two_datasets
    data_config = DataConfig(data_path=[prefix_a, prefix_b], blend_weights=[1.0, 2.0], seed=4)
    cfg = _schedule(unit)
    full, end = _run(data_config, cfg, TrainProgress(), dp_size=1)
    assert {b.shape for b in full} == {(32, 16), (16, 32), (8, 48), (8, 64)}  # curriculum ran
    first_part, middle = _run(data_config, cfg, TrainProgress(), dp_size=2, stop_at=13)
    state = json.loads(json.dumps(progress_state_dict(cfg, middle, data_parallel_size=2)))
    assert state["step"] == 13 and state["consumed_tokens"] == sum(b.numel() for b in first_part)
    resumed, resumed_end = _run(data_config, cfg, restore_progress(cfg, state, 4), dp_size=4)
    assert len(first_part) + len(resumed) == len(full)
    for expected, got in zip(full, first_part + resumed):
        assert torch.equal(expected, got)
    assert resumed_end == end


def test_restore_refuses_a_changed_schedule():
    cfg = _schedule("steps")
    state = progress_state_dict(cfg, TrainProgress(step=5, consumed_tokens=2560), 1)
    assert state["next_seq_length"] == 32 and state["next_global_batch_size"] == 16
    changed = _schedule("steps")
    changed.curriculum.start_seq_length = 48
    with pytest.raises(ValueError, match="schedule changed.*seq_length=48"):
        restore_progress(changed, state, 1)
    assert restore_progress(changed, state, 1, allow_schedule_change=True).step == 5
    with pytest.raises(ValueError, match="lacks"):
        restore_progress(cfg, {"step": 1}, 1)


def test_an_allowed_schedule_change_that_moves_the_lr_says_so(caplog):
    """Extending a finished cosine run recomputes the decay: the next LR jumps back up."""
    cfg = _schedule("steps")
    cfg.curriculum.enabled = False
    end = TrainProgress(step=30, consumed_tokens=30 * 512)
    state = json.loads(json.dumps(progress_state_dict(cfg, end, 1)))
    assert state["next_seq_length"] is None and state["next_lr"] == pytest.approx(cfg.min_lr)
    longer = _schedule("steps")
    longer.curriculum.enabled = False
    longer.train_steps = 300
    with caplog.at_level(logging.WARNING):
        restore_progress(longer, state, 1, allow_schedule_change=True)
    assert f"moves step 31's learning rate {cfg.min_lr:.4g} -> " in caplog.text
    assert "recomputed from the new settings" in caplog.text
    # A change that leaves the next step as it was is not worth a warning.
    caplog.clear()
    middle = TrainProgress(step=10, consumed_tokens=10 * 512)
    state = json.loads(json.dumps(progress_state_dict(cfg, middle, 1)))
    same = _schedule("steps")
    same.curriculum.enabled = False
    same.lr_warmup_init = 1e-9  # the warmup is over: nothing the next step sees
    with caplog.at_level(logging.WARNING):
        assert restore_progress(same, state, 1, allow_schedule_change=True).step == 10
        assert caplog.text == ""
        restore_progress(longer, state, 1, allow_schedule_change=True)
    assert "moves step 11's learning rate" in caplog.text
