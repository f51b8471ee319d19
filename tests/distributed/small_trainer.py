"""The training pieces the multi-process checkpoint and optimizer tests drive by hand.

``SmallTrainer`` joins this process's parallel group and builds the model, its DDP wrapper, the
optimizer and the LR schedule as the training loop does (``build_trainable``); a test feeds it
micro-batches one step at a time and saves or loads checkpoint directories. The tests subclass
it with their own data and bookkeeping. Imports are inside the methods so that importing this
module (in a test file, or in a spawned process) does not import megatron-core.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


class SmallTrainer:
    """Model + DDP + optimizer + LR scheduler on this process's parallel group."""

    def __init__(self, parallel, model, precision, optimizer, schedule, seed: int):
        from megatron.core import parallel_state

        from megatron_ext.parallel.init import initialize_parallel
        from megatron_ext.training.trainable import build_trainable

        self.ctx = initialize_parallel(parallel, seed=seed)
        trainable = build_trainable(
            model, parallel, precision, optimizer, schedule, self.ctx.device
        )
        self.model, self.optimizer = trainable.model, trainable.optimizer
        self.scheduler = trainable.scheduler
        self.is_last_stage = parallel_state.is_pipeline_last_stage()

    def seeded_micro_batches(
        self,
        seed: int,
        global_batch: int,
        seq_length: int,
        vocab: int,
        micro_batch: int,
        low: int = 0,
    ) -> list[dict]:
        """This data-parallel rank's micro-batches of a global batch of random tokens in
        ``[low, vocab)`` drawn from ``seed``: the same global batch on any layout."""
        from megatron_ext.data.batches import split_micro_batches

        generator = torch.Generator().manual_seed(seed)
        tokens = torch.randint(low, vocab, (global_batch, seq_length + 1), generator=generator)
        share = global_batch // self.ctx.layout.dp
        mine = tokens[self.ctx.dp_rank * share : (self.ctx.dp_rank + 1) * share]
        return split_micro_batches(mine, micro_batch)

    def train_on(self, micro_batches: list[dict], seq_length: int, **step_options) -> Any:
        """One training step on this rank's micro-batches, then one step of the LR schedule;
        returns the ``StepResult``. ``step_options``: further ``train_step`` arguments."""
        from megatron_ext.training.step import train_step

        result = train_step(
            self.model,
            self.optimizer,
            micro_batches,
            seq_length,
            self.ctx.torch_device,
            self.ctx.pp_group(),
            self.is_last_stage,
            **step_options,
        )
        self.scheduler.step(increment=1)
        return result

    def save_to(
        self, save_dir: Path, step: int, run_state: dict, config: dict, background=None
    ) -> Path:
        """``save_checkpoint`` of ``step`` into ``save_dir`` (default checkpoint settings)."""
        from megatron_ext.checkpoint.config import CheckpointConfig
        from megatron_ext.checkpoint.manager import save_checkpoint

        return save_checkpoint(
            CheckpointConfig(save_dir=str(save_dir)),
            save_dir.parent,
            step,
            self.model,
            self.optimizer,
            self.scheduler,
            run_state,
            config,
            self.ctx,
            background,
        )

    def load_from(self, save_dir: Path, config: dict) -> dict | None:
        """``load_checkpoint`` of the newest checkpoint in ``save_dir``; returns its run state."""
        from megatron_ext.checkpoint.config import CheckpointConfig
        from megatron_ext.checkpoint.manager import load_checkpoint

        return load_checkpoint(
            CheckpointConfig(save_dir=str(save_dir)),
            save_dir.parent,
            self.model,
            self.optimizer,
            self.scheduler,
            self.ctx,
            config,
        )
