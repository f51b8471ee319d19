"""The training loop: set up, resume, then step, log, evaluate and checkpoint until done.

Everything arrives through ``ExperimentConfig``; the loop owns no global state. One iteration:

1. the plan of the step (sequence length of the curriculum, global batch, micro-batches, LR) is a
   closed-form function of progress (``training.schedules``), so a resumed run repeats it exactly;
2. the step's micro-batches come from the background prefetcher, cut from the token stream at
   ``consumed_tokens`` (the wait is measured);
3. ``train_step`` runs megatron-core's schedule for the plan's sequence length and asks the
   monitor's stability guard before the optimizer touches the weights;
4. progress advances; metrics, evaluation, checkpoints and preemption follow. With
   ``checkpoint.async_save`` a checkpoint's files are written while the next steps run, and it is
   published at the first step boundary after its writers finished.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_ext.checkpoint.background import BackgroundSaves
from megatron_ext.checkpoint.manager import load_checkpoint, save_checkpoint
from megatron_ext.checkpoint.preemption import PreemptionHandler
from megatron_ext.config.errors import ConfigError, Problem
from megatron_ext.config.loader import save_config, to_dict
from megatron_ext.data.batches import get_eval_batches
from megatron_ext.data.fingerprint import data_fingerprints
from megatron_ext.data.prefetch import BatchPrefetcher, make_step_loader
from megatron_ext.data.token_stream import build_token_streams
from megatron_ext.monitoring.monitor import TrainingMonitor, format_record
from megatron_ext.parallel.init import (
    ParallelContext,
    destroy_parallel,
    initialize_parallel,
    on_rank0,
)
from megatron_ext.training.experiment import ExperimentConfig, validate_experiment
from megatron_ext.training.optimizer import current_loss_scale
from megatron_ext.training.schedules import (
    TrainProgress,
    advance,
    is_done,
    iter_step_plans,
    progress_state_dict,
    restore_progress,
    scheduler_increment,
)
from megatron_ext.training.step import mean_loss, run_forward_backward, train_step
from megatron_ext.training.trainable import build_trainable

logger = logging.getLogger(__name__)


@dataclass
class TrainSummary:
    """What a finished (or stopped) invocation did."""

    steps_run: int
    final_step: int
    consumed_tokens: int
    first_loss: float | None
    last_loss: float | None
    last_val_loss: float | None
    stopped_by: str
    """``done``, ``preempted``, ``exit_after_steps`` or ``stability``."""
    run_dir: str


@dataclass
class _Run:
    """The objects of one run, built once by ``_setup``."""

    ctx: ParallelContext
    model: list
    optimizer: object
    scheduler: object
    streams: object
    progress: TrainProgress
    data_fingerprints: list[dict]
    """What each dataset holds (``data.fingerprint``): saved with every checkpoint."""
    tokenizer_fingerprint: dict | None
    """What the configured tokenizer is (None without one): saved with every checkpoint."""
    monitor_state: dict | None
    """The checkpoint's monitor state (None: a new run, or a checkpoint without one)."""


def train(cfg: ExperimentConfig) -> TrainSummary:
    """Run (or resume) the experiment on the processes torchrun started (or this one alone)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    validate_experiment(cfg, world_size)
    ctx = initialize_parallel(cfg.parallel, cfg.seed)
    try:
        run = _setup(cfg, ctx)
        return _loop(cfg, run)
    finally:
        destroy_parallel()


def _setup(cfg: ExperimentConfig, ctx: ParallelContext) -> _Run:
    tokenizer_fingerprint = _tokenizer_on_rank0(cfg, ctx.rank)
    run_dir = Path(cfg.run_dir)
    if ctx.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    streams = build_token_streams(cfg.data)
    # Rank 0 reads them (a few hundred small reads per dataset, whatever its size) and every
    # rank takes its answer, or its error, so that all ranks agree on a resume's check.
    fingerprints = on_rank0(ctx.rank, lambda: data_fingerprints(cfg.data.data_path), ValueError)
    trainable = build_trainable(
        cfg.model,
        cfg.parallel,
        cfg.precision,
        cfg.optimizer,
        cfg.schedule,
        ctx.device,
        # An allowed schedule change must win over the values stored with the checkpoint.
        override_scheduler=_schedule_change_allowed(cfg),
    )
    ddp_chunks, optimizer, scheduler = trainable.model, trainable.optimizer, trainable.scheduler
    run_state = load_checkpoint(
        cfg.checkpoint,
        run_dir,
        ddp_chunks,
        optimizer,
        scheduler,
        ctx,
        to_dict(cfg),
        default_config_dict=to_dict(type(cfg)()),
        data_fingerprints=fingerprints,
        tokenizer_fingerprint=tokenizer_fingerprint,
    )
    progress = TrainProgress()
    if run_state is not None:
        progress = restore_progress(
            cfg.schedule,
            run_state["progress"],
            ctx.layout.dp,
            allow_schedule_change=_schedule_change_allowed(cfg),
            log=ctx.rank == 0,
        )
        if ctx.rank == 0:
            logger.info("resumed at step %d (%d tokens)", progress.step, progress.consumed_tokens)
    monitor_state = None if run_state is None else run_state.get("monitor")
    return _Run(
        ctx,
        ddp_chunks,
        optimizer,
        scheduler,
        streams,
        progress,
        fingerprints,
        tokenizer_fingerprint,
        monitor_state,
    )


def _schedule_change_allowed(cfg: ExperimentConfig) -> bool:
    return any(
        item == "schedule" or item.startswith("schedule.") for item in cfg.checkpoint.allow_changes
    )


def _tokenizer_on_rank0(cfg: ExperimentConfig, rank: int) -> dict | None:
    """Rank 0 checks the tokenizer (``_check_tokenizer``) and every rank takes its fingerprint or
    its problems, so that all ranks stop with the same message (training reads tokens, not the
    tokenizer, so the other ranks need no copy of its files)."""

    def check() -> tuple[dict | None, list[Problem]]:
        try:
            return _check_tokenizer(cfg), []
        except ConfigError as error:
            return None, error.problems

    fingerprint, problems = on_rank0(rank, check, RuntimeError)
    if problems:
        raise ConfigError(problems)
    return fingerprint


def _check_tokenizer(cfg: ExperimentConfig) -> dict | None:
    """The configured tokenizer loads and agrees with the model's vocabulary and the data's
    end-of-document id (a ConfigError, one line per problem with its fix, otherwise); returns
    its fingerprint (None without a tokenizer)."""
    if cfg.tokenizer.tokenizer_type == "none":
        return None
    from megatron_ext.tokenizer import load_tokenizer

    try:
        tokenizer = load_tokenizer(cfg.tokenizer.tokenizer_type, cfg.tokenizer.tokenizer_model)
    except Exception as error:  # noqa: BLE001 - a wrong file fails in many ways (RuntimeError, ...)
        raise ConfigError(
            [
                Problem(
                    "tokenizer.tokenizer_model",
                    cfg.tokenizer.tokenizer_model,
                    f"cannot be loaded as a {cfg.tokenizer.tokenizer_type} tokenizer ({error})",
                    "point it at the tokenizer the dataset was preprocessed with",
                )
            ]
        ) from error
    problems = []
    if tokenizer.vocab_size > cfg.model.vocab_size:
        problems.append(
            Problem(
                "model.vocab_size",
                cfg.model.vocab_size,
                f"smaller than the tokenizer's {tokenizer.vocab_size} tokens",
                f"set model.vocab_size={tokenizer.vocab_size}",
            )
        )
    if cfg.data.eod_token_id is not None and cfg.data.eod_token_id != tokenizer.eod:
        problems.append(
            Problem(
                "data.eod_token_id",
                cfg.data.eod_token_id,
                f"differs from the tokenizer's end-of-document id {tokenizer.eod}",
                f"set data.eod_token_id={tokenizer.eod}",
            )
        )
    if problems:
        raise ConfigError(problems)
    return tokenizer.fingerprint()


def _loop(cfg: ExperimentConfig, run: _Run) -> TrainSummary:
    ctx = run.ctx
    dp = ctx.layout.dp
    is_last_stage = ctx.pp_rank == ctx.layout.pp - 1
    pp_group = ctx.pp_group()
    load = make_step_loader(
        run.streams.train,
        dp_rank=ctx.dp_rank,
        dp_size=dp,
        micro_batch_size=cfg.schedule.micro_batch_size,
        **_batch_options(cfg),
    )
    prefetcher = BatchPrefetcher(
        load,
        (plan.request for plan in iter_step_plans(cfg.schedule, run.progress, dp)),
        num_workers=cfg.data.num_workers,
        prefetch_batches=cfg.data.prefetch_batches,
        pin_memory=cfg.data.pin_memory,
    )
    monitor = TrainingMonitor(
        cfg.monitoring, Path(cfg.run_dir), ctx, run.model, cfg.model, run_config=to_dict(cfg)
    )
    if run.monitor_state is not None:
        monitor.load_state_dict(run.monitor_state)
    preemption = PreemptionHandler()
    eval_batches = _eval_batches(cfg, run)
    progress = run.progress
    start_step = progress.step
    first_loss = last_loss = val_loss = None
    stopped_by = "done"
    background = BackgroundSaves() if cfg.checkpoint.async_save else None
    try:
        for plan in iter_step_plans(cfg.schedule, progress, dp):
            batch = prefetcher.next()
            assert batch.request == plan.request, (batch.request, plan.request)
            monitor.start_step(plan.step + 1)
            loss_scale = current_loss_scale(run.optimizer)
            began = time.perf_counter()
            result = train_step(
                run.model,
                run.optimizer,
                batch.micro_batches,
                plan.seq_length,
                ctx.torch_device,
                pp_group,
                is_last_stage,
                allow_update=monitor.update_gate(plan.step + 1, loss_scale),
            )
            step_time = time.perf_counter() - began
            monitor.forward_backward_done()
            # The LR schedule follows the step count, skipped updates included, so that it stays
            # the closed form of progress (as the data position does).
            lr = run.optimizer.param_groups[0]["lr"]
            run.scheduler.step(increment=scheduler_increment(cfg.schedule, plan))
            progress = advance(progress, plan)
            first_loss = result.loss if first_loss is None else first_loss
            last_loss = result.loss
            step = progress.step
            done = is_done(cfg.schedule, progress)
            evaluated = _eval_due(cfg, step) or done
            if evaluated:
                val_loss = _evaluate(cfg, run, eval_batches, is_last_stage, pp_group)
            record = monitor.end_step(
                step,
                _step_scalars(
                    plan, progress, result, lr, loss_scale, val_loss if evaluated else None
                ),
                {
                    "step_time": step_time,
                    "data_wait": batch.wait_ms / 1000.0,
                    "forward_backward": result.forward_backward_s,
                    "optimizer": result.optimizer_s,
                },
            )
            if ctx.is_logging_rank and (step % cfg.monitoring.log_interval == 0 or done):
                logger.info(format_record(record))
            stop = _stop_reason(cfg, monitor, preemption, ctx, step, start_step)
            preempted = stop == "preempted"
            at_exit = (done or stop is not None) and cfg.checkpoint.save_on_exit
            if background is not None:
                background.finalize_finished()
            if _checkpoint_due(cfg, step) or preempted or at_exit:
                _save(cfg, run, progress, monitor, background)
            if stop is not None:
                stopped_by = stop
                break
        if background is not None:
            background.wait()  # the run returns with its last checkpoint published
    except BaseException:
        if background is not None:
            background.abort()
        raise
    finally:
        prefetcher.close()
        preemption.close()
        monitor.close()
    return TrainSummary(
        steps_run=progress.step - start_step,
        final_step=progress.step,
        consumed_tokens=progress.consumed_tokens,
        first_loss=first_loss,
        last_loss=last_loss,
        last_val_loss=val_loss,
        stopped_by=stopped_by,
        run_dir=cfg.run_dir,
    )


def _step_scalars(plan, progress, result, lr: float, loss_scale: float, val_loss) -> dict:
    """The per-step scalars of metrics.jsonl that the loop knows (the monitor adds the rest)."""
    return {
        "consumed_tokens": progress.consumed_tokens,
        "consumed_samples": progress.consumed_samples,
        "seq_length": plan.seq_length,
        "global_batch_size": plan.global_batch_size,
        "num_microbatches": plan.num_microbatches,
        "loss": result.loss,
        "grad_norm": result.grad_norm,
        "lr": lr,
        "loss_scale": loss_scale,
        "skipped": result.skipped,
        "num_tokens": plan.num_tokens,
        "val_loss": val_loss,
    }


def _eval_due(cfg: ExperimentConfig, step: int) -> bool:
    interval = cfg.training.eval_interval
    return interval > 0 and step % interval == 0


def _checkpoint_due(cfg: ExperimentConfig, step: int) -> bool:
    return cfg.checkpoint.interval > 0 and step % cfg.checkpoint.interval == 0


def _stop_reason(cfg, monitor, preemption, ctx, step: int, start_step: int) -> str | None:
    if preemption.should_stop(ctx):
        return "preempted"
    if monitor.stop_requested:
        return "stability"
    exit_after = cfg.training.exit_after_steps
    if exit_after is not None and step - start_step >= exit_after:
        return "exit_after_steps"
    return None


def _save(
    cfg: ExperimentConfig,
    run: _Run,
    progress: TrainProgress,
    monitor: TrainingMonitor,
    background: BackgroundSaves | None,
) -> None:
    run_state = {
        "progress": progress_state_dict(cfg.schedule, progress, run.ctx.layout.dp),
        "data": run.data_fingerprints,
        "tokenizer": run.tokenizer_fingerprint,
        "monitor": monitor.state_dict(),
    }
    save_checkpoint(
        cfg.checkpoint,
        Path(cfg.run_dir),
        progress.step,
        run.model,
        run.optimizer,
        run.scheduler,
        run_state,
        to_dict(cfg),
        run.ctx,
        background,
    )


def _eval_batches(cfg: ExperimentConfig, run: _Run) -> list | None:
    """The fixed validation batches, read once (None when the split has no validation part)."""
    if run.streams.valid is None or cfg.training.eval_iters <= 0:
        return None
    ctx = run.ctx
    needed = cfg.training.eval_iters * cfg.schedule.global_batch_size * cfg.schedule.seq_length
    held = sum(s.num_tokens for s in run.streams.valid.sources)
    if needed > held and ctx.rank == 0:
        logger.warning(
            "the validation batches take %d tokens but the validation split holds %d: they "
            "repeat its documents (%.1f times); lower training.eval_iters or give data.split a "
            "larger validation part",
            needed,
            held,
            needed / held,
        )
    return get_eval_batches(
        run.streams.valid,
        cfg.training.eval_iters,
        cfg.schedule.global_batch_size,
        cfg.schedule.seq_length,
        ctx.dp_rank,
        ctx.layout.dp,
        cfg.schedule.micro_batch_size,
        **_batch_options(cfg),
    )


def _batch_options(cfg: ExperimentConfig) -> dict[str, bool]:
    """How micro-batches are cut, the same for training and validation batches (so that the
    validation loss is the training loss's measure)."""
    return {
        "eod_mask_loss": cfg.data.eod_mask_loss,
        "reset_position_ids": cfg.data.reset_position_ids,
    }


@torch.no_grad()
def _evaluate(
    cfg: ExperimentConfig, run: _Run, batches: list | None, is_last_stage: bool, pp_group
) -> float | None:
    """Mean loss over the fixed validation batches (None without validation data)."""
    if batches is None:
        return None
    ctx = run.ctx
    for chunk in run.model:
        chunk.eval()
    losses = []
    for micro_batches in batches:
        loss_dicts = run_forward_backward(
            run.model, micro_batches, cfg.schedule.seq_length, ctx.torch_device, forward_only=True
        )
        losses.append(mean_loss(loss_dicts, ctx.torch_device, pp_group, is_last_stage))
    for chunk in run.model:
        chunk.train()
    return sum(losses) / len(losses)
