"""Closed-form schedules: sequence length, batch size and learning rate per step.

Every value is a function of the run's progress (step, consumed tokens), never of history, so a
resumed run recomputes exactly what the original would have used:

    check_schedule(cfg, dp_size)                             # every step's batch arithmetic
    progress = TrainProgress()                               # or restore_progress(...)
    loader = make_step_loader(stream, dp_rank=r, dp_size=dp_size, micro_batch_size=m)
    requests = (p.request for p in iter_step_plans(cfg, progress, dp_size))
    with BatchPrefetcher(loader, requests) as prefetcher:
        for plan in iter_step_plans(cfg, progress, dp_size):  # one StepPlan per optimizer step
            batch = prefetcher.next()                         # batch.request == plan.request
            # forward/backward batch.micro_batches: plan.num_microbatches of plan.seq_length
            scheduler.step(increment=scheduler_increment(cfg, plan))
            progress = advance(progress, plan)               # store progress_state_dict(...)

Sequence length (curriculum): ``L = clamp(floor_to(multiple, start + (full - start) * x),
start, full)`` with ``x`` the progress through the first ``fraction`` of training, in steps or
tokens (``schedule.unit``). Batch: ``sequences`` mode keeps ``global_batch_size`` sequences;
``tokens`` mode uses ``floor(global_batch_size * seq_length / L / b) * b`` sequences with ``b``
the batch multiple, so tokens per step stay within ``b * L`` below the full-length step.

Learning rate (the same formula as megatron-core's ``OptimizerParamScheduler``): linear from
``lr_warmup_init`` to ``lr`` over the warmup, then cosine (or linear) to ``min_lr`` at the end of
training, ``min_lr`` after it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass

from megatron_ext.config.errors import ConfigError, ProblemCollector
from megatron_ext.data.batches import BatchRequest, num_microbatches
from megatron_ext.training.schedule_config import ScheduleConfig

logger = logging.getLogger(__name__)


# ---- progress and per-step plan ----------------------------------------------------------------
@dataclass(frozen=True)
class TrainProgress:
    """Where the run is: completed steps, and the stream position after them."""

    step: int = 0
    consumed_tokens: int = 0
    consumed_samples: int = 0


@dataclass(frozen=True)
class StepPlan:
    """Everything the loop needs to run step ``step``."""

    step: int
    consumed_tokens: int
    """Stream position where this step's data starts."""
    consumed_samples: int
    seq_length: int
    global_batch_size: int
    num_microbatches: int
    lr: float
    """The closed-form LR of this step (megatron-core's scheduler must agree)."""

    @property
    def num_tokens(self) -> int:
        return self.global_batch_size * self.seq_length

    @property
    def request(self) -> BatchRequest:
        return BatchRequest(
            consumed_tokens=self.consumed_tokens,
            global_batch_size=self.global_batch_size,
            seq_length=self.seq_length,
            step=self.step,
        )


def advance(progress: TrainProgress, plan: StepPlan) -> TrainProgress:
    """Progress after ``plan``'s step: exact token and sample accounting."""
    assert plan.step == progress.step and plan.consumed_tokens == progress.consumed_tokens
    return TrainProgress(
        step=progress.step + 1,
        consumed_tokens=progress.consumed_tokens + plan.num_tokens,
        consumed_samples=progress.consumed_samples + plan.global_batch_size,
    )


def is_done(cfg: ScheduleConfig, progress: TrainProgress) -> bool:
    """True once the run has reached its length (steps, or tokens for ``unit: tokens``)."""
    if cfg.unit == "tokens":
        return progress.consumed_tokens >= cfg.train_tokens
    return progress.step >= cfg.train_steps


def plan_step(cfg: ScheduleConfig, progress: TrainProgress, data_parallel_size: int) -> StepPlan:
    """The plan of the step that starts at ``progress``."""
    seq_length = curriculum_seq_length(cfg, progress.step, progress.consumed_tokens)
    batch = step_global_batch_size(cfg, seq_length, data_parallel_size)
    return StepPlan(
        step=progress.step,
        consumed_tokens=progress.consumed_tokens,
        consumed_samples=progress.consumed_samples,
        seq_length=seq_length,
        global_batch_size=batch,
        num_microbatches=num_microbatches(batch, cfg.micro_batch_size, data_parallel_size),
        lr=lr_for_progress(cfg, progress.step, progress.consumed_tokens),
    )


def iter_step_plans(
    cfg: ScheduleConfig, progress: TrainProgress, data_parallel_size: int
) -> Iterator[StepPlan]:
    """Plans of every remaining step, in order (feed ``plan.request`` to the prefetcher)."""
    while not is_done(cfg, progress):
        plan = plan_step(cfg, progress, data_parallel_size)
        yield plan
        progress = advance(progress, plan)


def planned_tokens(cfg: ScheduleConfig, data_parallel_size: int) -> int:
    """How many tokens of the training stream a whole run reads, from step 0: every step's
    ``global_batch_size * seq_length`` plus the one label token after the last sequence."""
    end = 0
    for plan in iter_step_plans(cfg, TrainProgress(), data_parallel_size):
        end = plan.consumed_tokens + plan.num_tokens
    return end + 1


# ---- curriculum and batch -----------------------------------------------------------------------
def curriculum_seq_length(cfg: ScheduleConfig, step: int, consumed_tokens: int = 0) -> int:
    """Sequence length of the step that starts at (``step``, ``consumed_tokens``)."""
    c = cfg.curriculum
    full = cfg.seq_length
    if not c.enabled or c.start_seq_length >= full:
        return full
    if cfg.unit == "tokens":
        done, ramp = consumed_tokens, round(c.fraction * cfg.train_tokens)
    else:
        done, ramp = step, round(c.fraction * cfg.train_steps)
    if ramp <= 0 or done >= ramp:
        return full
    # Integer arithmetic: exact and identical on every rank and every resume.
    grown = c.start_seq_length + (full - c.start_seq_length) * done // ramp
    rounded = (grown // c.multiple) * c.multiple
    return min(full, max(c.start_seq_length, rounded))


def curriculum_lengths(cfg: ScheduleConfig) -> list[int]:
    """Every sequence length the curriculum can produce, ascending."""
    c = cfg.curriculum
    if not c.enabled or c.start_seq_length >= cfg.seq_length:
        return [cfg.seq_length]
    lengths = {c.start_seq_length, cfg.seq_length}
    first = -(-c.start_seq_length // c.multiple) * c.multiple
    lengths.update(range(first, cfg.seq_length, c.multiple))
    return sorted(length for length in lengths if c.start_seq_length <= length <= cfg.seq_length)


def batch_multiple(cfg: ScheduleConfig, data_parallel_size: int) -> int:
    """The multiple the ``tokens``-mode global batch is rounded down to."""
    if cfg.curriculum.batch_multiple is not None:
        return cfg.curriculum.batch_multiple
    return cfg.micro_batch_size * data_parallel_size


def step_global_batch_size(cfg: ScheduleConfig, seq_length: int, data_parallel_size: int) -> int:
    """Global batch in sequences for a step of ``seq_length`` tokens per sequence."""
    if not cfg.curriculum.enabled or cfg.curriculum.mode == "sequences":
        return cfg.global_batch_size
    multiple = batch_multiple(cfg, data_parallel_size)
    return (cfg.tokens_per_step // seq_length // multiple) * multiple


def check_schedule(
    cfg: ScheduleConfig,
    data_parallel_size: int,
    *,
    interleaved_stages: int | None = None,
    sequence_shards: int = 1,
) -> None:
    """Raise one ConfigError listing every problem, including the batch arithmetic of every
    sequence length the curriculum will use (checked up front, not at the step it fails).

    ``interleaved_stages``: the pipeline stages when the interleaved schedule runs (virtual
    pipeline chunks); megatron-core's interleaved schedule needs every step's micro-batch count
    to be a multiple of them. ``sequence_shards``: the tensor-parallel size under sequence
    parallelism, which splits every sequence into that many equal parts.
    """
    problems = ProblemCollector()
    cfg.validate(problems)
    problems.raise_if_any()
    per_pass = cfg.micro_batch_size * data_parallel_size
    if cfg.curriculum.enabled and cfg.curriculum.mode == "tokens":
        multiple = batch_multiple(cfg, data_parallel_size)
        problems.check(
            multiple % per_pass == 0,
            "schedule.curriculum.batch_multiple",
            multiple,
            f"tokens mode rounds the global batch to multiples of {multiple}, which "
            f"micro_batch_size*dp={cfg.micro_batch_size}*{data_parallel_size}={per_pass} "
            "does not divide",
            f"use a batch_multiple that is a multiple of {per_pass}",
        )
        problems.check(
            cfg.global_batch_size % multiple == 0,
            "schedule.global_batch_size",
            cfg.global_batch_size,
            f"tokens mode rounds the global batch down to a multiple of {multiple}, so the "
            f"full-length step would not hold global_batch_size sequences",
            f"use a global_batch_size that is a multiple of {multiple}",
        )
    problems.raise_if_any()
    for length in curriculum_lengths(cfg):
        where = f" (at sequence length {length})" if length != cfg.seq_length else ""
        batch = step_global_batch_size(cfg, length, data_parallel_size)
        try:
            micro = num_microbatches(batch, cfg.micro_batch_size, data_parallel_size)
        except ConfigError as exc:
            for p in exc.problems:
                problems.add(p.field, p.value, p.rule + where, p.fix)
            break
        if interleaved_stages is not None and micro % interleaved_stages:
            problems.add(
                "schedule.global_batch_size",
                batch,
                f"the interleaved pipeline schedule needs a multiple of the {interleaved_stages} "
                f"pipeline stages micro-batches per step, this step has {micro}{where}",
                f"make global_batch_size / (micro_batch_size*dp) a multiple of "
                f"{interleaved_stages} at every length (in tokens mode: a batch_multiple of "
                f"{cfg.micro_batch_size * data_parallel_size * interleaved_stages}), or drop "
                "virtual_pipeline_model_parallel_size",
            )
            break
        if length % sequence_shards:
            if length == cfg.seq_length:
                field = "schedule.seq_length"
            elif length == cfg.curriculum.start_seq_length:
                field = "schedule.curriculum.start_seq_length"
            else:
                field = "schedule.curriculum.multiple"
            problems.add(
                field,
                length,
                f"sequence parallelism splits each sequence into {sequence_shards} equal parts"
                f"{where}",
                f"use lengths divisible by {sequence_shards} (a curriculum multiple of "
                f"{sequence_shards} and a start length divisible by it)",
            )
            break
    problems.raise_if_any()


# ---- learning rate ------------------------------------------------------------------------------
def _lr(cfg: ScheduleConfig, done: int, warmup: int, total: int) -> float:
    peak, floor = cfg.lr, cfg.min_lr
    if warmup > 0 and done <= warmup:
        return cfg.lr_warmup_init + (peak - cfg.lr_warmup_init) * done / warmup
    if cfg.lr_decay_style == "constant":
        return peak
    if done > total:
        return floor
    ratio = (done - warmup) / (total - warmup)
    if cfg.lr_decay_style == "linear":
        coeff = 1.0 - ratio
    else:
        coeff = 0.5 * (math.cos(math.pi * ratio) + 1.0)
    return floor + coeff * (peak - floor)


def lr_at(cfg: ScheduleConfig, step: int) -> float:
    """LR of step ``step`` (0-based; the number of scheduler increments so far)."""
    return _lr(cfg, step, cfg.lr_warmup_steps, cfg.train_steps)


def lr_at_tokens(cfg: ScheduleConfig, consumed_tokens: int) -> float:
    """LR of the step that starts at ``consumed_tokens`` (``unit: tokens``)."""
    return _lr(cfg, consumed_tokens, cfg.lr_warmup_tokens, cfg.train_tokens)


def lr_for_progress(cfg: ScheduleConfig, step: int, consumed_tokens: int) -> float:
    """LR in the configured unit."""
    if cfg.unit == "tokens":
        return lr_at_tokens(cfg, consumed_tokens)
    return lr_at(cfg, step)


def megatron_scheduler_kwargs(cfg: ScheduleConfig, *, weight_decay: float) -> dict:
    """Keyword arguments (all but ``optimizer``) of megatron-core's ``OptimizerParamScheduler``.

    In ``unit: tokens`` its "steps" are tokens: advance it with ``scheduler_increment``.
    Weight decay is constant (the recipe: 0.1). ``use_checkpoint_opt_param_scheduler=False``
    makes its ``load_state_dict`` refuse a checkpoint whose schedule differs from the config.
    """
    if cfg.unit == "tokens":
        warmup, total = cfg.lr_warmup_tokens, cfg.train_tokens
    else:
        warmup, total = cfg.lr_warmup_steps, cfg.train_steps
    return {
        "init_lr": cfg.lr_warmup_init,
        "max_lr": cfg.lr,
        "min_lr": cfg.min_lr,
        "lr_warmup_steps": warmup,
        "lr_decay_steps": total,
        "lr_decay_style": cfg.lr_decay_style,
        "start_wd": weight_decay,
        "end_wd": weight_decay,
        "wd_incr_steps": total,
        "wd_incr_style": "constant",
        "use_checkpoint_opt_param_scheduler": False,
        "override_opt_param_scheduler": False,
    }


def scheduler_increment(cfg: ScheduleConfig, plan: StepPlan) -> int:
    """What to pass to ``OptimizerParamScheduler.step(increment=...)`` after ``plan``'s step."""
    return plan.num_tokens if cfg.unit == "tokens" else 1


# ---- checkpoint state ---------------------------------------------------------------------------
def progress_state_dict(
    cfg: ScheduleConfig, progress: TrainProgress, data_parallel_size: int
) -> dict:
    """The data position and curriculum state to store in a checkpoint (plain ints)."""
    nxt = None if is_done(cfg, progress) else plan_step(cfg, progress, data_parallel_size)
    return {
        "step": progress.step,
        "consumed_tokens": progress.consumed_tokens,
        "consumed_samples": progress.consumed_samples,
        "next_seq_length": None if nxt is None else nxt.seq_length,
        "next_global_batch_size": None if nxt is None else nxt.global_batch_size,
        "next_lr": lr_for_progress(cfg, progress.step, progress.consumed_tokens),
    }


def restore_progress(
    cfg: ScheduleConfig,
    state: dict,
    data_parallel_size: int,
    *,
    allow_schedule_change: bool = False,
    log: bool = True,
) -> TrainProgress:
    """Progress from ``progress_state_dict`` output; the next batch is then exactly the one the
    saved run would have read. Raises ValueError when the current config would give the next
    step another sequence length or batch size than the saved run (a changed schedule),
    unless ``allow_schedule_change``; an allowed change that moves the next step's learning rate
    or sequence length is logged as a warning (the schedule is recomputed from the new settings,
    not continued from where the saved run was; ``log``: on this rank)."""
    missing = [k for k in ("step", "consumed_tokens", "consumed_samples") if k not in state]
    if missing:
        raise ValueError(f"data state lacks {missing}; got keys {sorted(state)}")
    progress = TrainProgress(
        step=int(state["step"]),
        consumed_tokens=int(state["consumed_tokens"]),
        consumed_samples=int(state["consumed_samples"]),
    )
    if is_done(cfg, progress):
        return progress
    nxt = plan_step(cfg, progress, data_parallel_size)
    if allow_schedule_change:
        if log:
            _warn_moved_schedule(cfg, progress, nxt, state)
        return progress
    saved = (state.get("next_seq_length"), state.get("next_global_batch_size"))
    if saved != (None, None) and saved != (nxt.seq_length, nxt.global_batch_size):
        raise ValueError(
            f"the schedule changed since the checkpoint: step {progress.step} would use "
            f"seq_length={nxt.seq_length}, global_batch_size={nxt.global_batch_size} but the saved "
            f"run planned seq_length={saved[0]}, global_batch_size={saved[1]}. Restore the "
            "schedule settings or allow the change explicitly"
        )
    return progress


def _warn_moved_schedule(
    cfg: ScheduleConfig, progress: TrainProgress, nxt: StepPlan, state: dict
) -> None:
    moved = []
    saved_lr = state.get("next_lr")
    lr = lr_for_progress(cfg, progress.step, progress.consumed_tokens)
    if saved_lr is not None and not math.isclose(lr, saved_lr, rel_tol=1e-3):
        moved.append(f"learning rate {saved_lr:.4g} -> {lr:.4g}")
    saved_length = state.get("next_seq_length")
    if saved_length is not None and saved_length != nxt.seq_length:
        moved.append(f"sequence length {saved_length} -> {nxt.seq_length}")
    if moved:
        logger.warning(
            "the allowed schedule change moves step %d's %s: warmup, decay and curriculum are "
            "recomputed from the new settings at step %d, not continued from the saved run's",
            progress.step + 1,
            " and ".join(moved),
            progress.step,
        )
