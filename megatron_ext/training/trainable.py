"""Everything a training step needs, built in one call: model, DDP, optimizer, LR schedule.

The training loop, the benchmarks and the multi-process tests all build the same chain::

    trainable = build_trainable(model_cfg, parallel, precision, optim, schedule, ctx.device)
    train_step(trainable.model, trainable.optimizer, ...)
    trainable.scheduler.step(increment=...)

``model`` is the list of DDP-wrapped model chunks (one per virtual pipeline stage), which is what
megatron-core's schedules, the checkpoint functions and the monitor take.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from megatron_ext.models.builder import build_model
from megatron_ext.models.config import ModelConfig, PrecisionConfig
from megatron_ext.parallel.config import ParallelConfig
from megatron_ext.training.optimizer import OptimizerConfig, prepare_for_training
from megatron_ext.training.schedule_config import ScheduleConfig
from megatron_ext.training.schedules import megatron_scheduler_kwargs


@dataclass
class Trainable:
    """The model chunks under megatron-core's DDP, its optimizer and the LR/WD scheduler."""

    model: list
    optimizer: Any
    scheduler: Any


def build_trainable(
    model_cfg: ModelConfig,
    parallel: ParallelConfig,
    precision: PrecisionConfig,
    optim: OptimizerConfig,
    schedule: ScheduleConfig,
    device: str,
    override_scheduler: bool = False,
) -> Trainable:
    """Build this rank's model chunks, wrap them in DDP, and attach AdamW and the LR schedule.

    ``override_scheduler``: a resumed run takes the configured schedule instead of the one stored
    in the checkpoint (for an allowed schedule change).
    """
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    chunks = build_model(model_cfg, parallel, precision, device)
    model, optimizer = prepare_for_training(
        chunks, parallel, precision, optim, peak_lr=schedule.lr, min_lr=schedule.min_lr
    )
    kwargs = megatron_scheduler_kwargs(schedule, weight_decay=optim.weight_decay)
    kwargs["override_opt_param_scheduler"] = override_scheduler
    return Trainable(model, optimizer, OptimizerParamScheduler(optimizer, **kwargs))
