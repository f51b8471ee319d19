"""Configuration of the batch, learning-rate and sequence-length schedules (section ``schedule``).

The recipe (examples/configs) sets::

    schedule:
      seq_length: 8192
      global_batch_size: 2048
      lr_warmup_steps: 5000
      min_lr_ratio: 0.1
      lr_decay_style: cosine
      curriculum: {enabled: true, start_seq_length: 2048, fraction: 0.1, multiple: 256}

The defaults below run the tiny CPU job.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from megatron_ext.config.errors import ProblemCollector


@dataclass(kw_only=True)
class CurriculumConfig:
    """Sequence-length warmup: linear from ``start_seq_length`` to ``schedule.seq_length``."""

    enabled: bool = True
    """Grow the sequence length during the first ``fraction`` of training."""

    start_seq_length: int = 64
    """Sequence length of the first step (the recipe: 2,048)."""

    fraction: float = 0.1
    """Part of training (in ``schedule.unit``: steps or tokens, rounded to a whole number) over
    which the length grows."""

    multiple: int = 32
    """Lengths are rounded down to a multiple of this (the recipe: 256), then clamped to
    ``[start_seq_length, seq_length]``."""

    mode: Literal["sequences", "tokens"] = "sequences"
    """``sequences``: the global batch stays ``global_batch_size`` sequences of the current
    length (the recipe as written; early steps hold fewer tokens). ``tokens``: each step holds
    about ``global_batch_size * seq_length`` tokens, as more, shorter sequences."""

    batch_multiple: int | None = None
    """``tokens`` mode only: the global batch (in sequences) is rounded down to a multiple of
    this. It must be a multiple of ``micro_batch_size * data-parallel size`` of every layout the
    run will use; None takes ``micro_batch_size * data-parallel size`` of the current run (then
    resuming on another layout can change the batch sizes of the remaining curriculum)."""


@dataclass(kw_only=True)
class ScheduleConfig:
    """Batch size, sequence length, training length and the learning-rate schedule."""

    seq_length: int = 128
    """Full context length in tokens (the recipe: 8,192)."""

    global_batch_size: int = 8
    """Sequences per optimizer step at full length (the recipe: 2,048), whatever the number of
    GPUs; gradient accumulation makes up the difference."""

    micro_batch_size: int = 2
    """Sequences per forward/backward pass on one data-parallel rank."""

    train_steps: int = 200
    """Optimizer steps of the run (``unit: steps``); the LR decays to its minimum here."""

    unit: Literal["steps", "tokens"] = "steps"
    """What the LR schedule and the curriculum progress are measured in. ``tokens`` needs
    ``train_tokens`` and ``lr_warmup_tokens`` and suits curriculum runs whose steps differ in
    size."""

    train_tokens: int | None = None
    """``unit: tokens``: training ends at the first step boundary at or past this many tokens."""

    lr: float = 1.0e-3
    """Peak learning rate, reached at the end of warmup."""

    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of ``lr`` (the recipe: 10%)."""

    lr_warmup_init: float = 0.0
    """Learning rate at step 0; warmup is linear from here to ``lr``."""

    lr_warmup_steps: int = 20
    """Steps of linear warmup (the recipe: 5,000)."""

    lr_warmup_tokens: int | None = None
    """``unit: tokens``: tokens of linear warmup."""

    lr_decay_style: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warmup, to ``min_lr_ratio * lr`` at the end of training."""

    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    """Sequence-length curriculum."""

    @property
    def min_lr(self) -> float:
        return self.min_lr_ratio * self.lr

    @property
    def tokens_per_step(self) -> int:
        """Tokens of a full-length step: the constant of the ``tokens`` curriculum mode."""
        return self.global_batch_size * self.seq_length

    def validate(self, problems: ProblemCollector) -> None:
        """Add every problem of this section to ``problems``. The batch arithmetic, which needs
        the data-parallel size, is checked by ``training.schedules.check_schedule``."""
        positive = ("seq_length", "global_batch_size", "micro_batch_size", "train_steps")
        for name in positive:
            value = getattr(self, name)
            problems.check(
                value >= 1, f"schedule.{name}", value, "must be >= 1", "use a value >= 1"
            )
        problems.check(
            self.lr > 0, "schedule.lr", self.lr, "must be > 0", "use a peak LR such as 3e-4"
        )
        problems.check(
            0.0 <= self.min_lr_ratio <= 1.0,
            "schedule.min_lr_ratio",
            self.min_lr_ratio,
            "must be in [0, 1]",
            "use 0.1 for a decay to 10% of the peak",
        )
        problems.check(
            0.0 <= self.lr_warmup_init <= self.lr,
            "schedule.lr_warmup_init",
            self.lr_warmup_init,
            f"must be in [0, lr={self.lr}]",
            "use 0.0",
        )
        if self.unit == "steps":
            problems.check(
                0 <= self.lr_warmup_steps < self.train_steps,
                "schedule.lr_warmup_steps",
                self.lr_warmup_steps,
                f"must be in [0, train_steps={self.train_steps})",
                "shorten the warmup or train longer",
            )
        else:
            self._validate_token_unit(problems)
        self._validate_curriculum(problems)

    def _validate_token_unit(self, problems: ProblemCollector) -> None:
        ok = problems.check(
            self.train_tokens is not None and self.train_tokens >= 1,
            "schedule.train_tokens",
            self.train_tokens,
            "unit=tokens needs the training length in tokens",
            f"set schedule.train_tokens (e.g. train_steps*tokens_per_step="
            f"{self.train_steps * self.tokens_per_step})",
        )
        if ok:
            problems.check(
                self.lr_warmup_tokens is not None
                and 0 <= self.lr_warmup_tokens < self.train_tokens,
                "schedule.lr_warmup_tokens",
                self.lr_warmup_tokens,
                f"unit=tokens needs a warmup in [0, train_tokens={self.train_tokens})",
                f"set schedule.lr_warmup_tokens (e.g. lr_warmup_steps*tokens_per_step="
                f"{self.lr_warmup_steps * self.tokens_per_step})",
            )

    def _validate_curriculum(self, problems: ProblemCollector) -> None:
        c = self.curriculum
        if not c.enabled:
            return
        problems.check(
            1 <= c.start_seq_length <= self.seq_length,
            "schedule.curriculum.start_seq_length",
            c.start_seq_length,
            f"must be in [1, seq_length={self.seq_length}]",
            "start shorter than the full context (the recipe: 2048 of 8192)",
        )
        problems.check(
            c.multiple >= 1,
            "schedule.curriculum.multiple",
            c.multiple,
            "must be >= 1",
            "use a multiple such as 256 (kernel-friendly lengths)",
        )
        problems.check(
            0.0 <= c.fraction <= 1.0,
            "schedule.curriculum.fraction",
            c.fraction,
            "must be in [0, 1]",
            "use 0.1 for the first 10% of training",
        )
        if c.batch_multiple is not None:
            problems.check(
                c.batch_multiple >= 1,
                "schedule.curriculum.batch_multiple",
                c.batch_multiple,
                "must be >= 1",
                "use a multiple of micro_batch_size * data-parallel size",
            )
