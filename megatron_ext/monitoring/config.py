"""Monitoring settings: what is measured, how often, where it goes, what instability does."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from megatron_ext.config.errors import ProblemCollector

Action = Literal["log", "skip", "stop"]


@dataclass(kw_only=True)
class MonitoringConfig:
    """Scalars every step, per-layer statistics every N steps, sinks and stability actions."""

    log_interval: int = 1
    """Write scalars to TensorBoard/wandb and compute the parameter norm every this many steps
    (metrics.jsonl gets a record every step regardless)."""
    activation_stats_interval: int = 10
    """Per-layer activation statistics, per-layer gradient norms and the update-to-weight ratio
    every this many steps (0 turns them off; off-interval steps cost nothing)."""
    tensorboard: bool = True
    """Write TensorBoard event files under <run_dir>/tensorboard."""
    wandb: bool = False
    """Log to Weights & Biases under <run_dir>/wandb (see wandb_mode)."""
    wandb_mode: Literal["offline", "online"] = "offline"
    """offline: a local run directory for a later `wandb sync`, no network; online: stream to the
    server (needs WANDB_API_KEY or `wandb login`)."""
    wandb_project: str = "megatron_ext"
    """wandb project name."""
    wandb_run_name: str | None = None
    """wandb run name (None: the name of the run directory)."""
    peak_flops_per_gpu: float | None = None
    """Dense bf16 peak FLOP/s of one accelerator for MFU (None: looked up by GPU name; on CPU or
    an unknown GPU MFU is not reported)."""
    spike_window: int = 100
    """Number of recent steps the spike detectors compare against."""
    spike_min_steps: int = 20
    """Values the window must hold before spike detection is active (early training is noisy)."""
    spike_method: Literal["zscore", "ratio"] = "zscore"
    """zscore: value above window mean by threshold running standard deviations; ratio: value above
    threshold x window mean."""
    loss_spike_threshold: float = 6.0
    """Spike threshold for the loss (std units for zscore, a factor for ratio)."""
    grad_norm_spike_threshold: float = 6.0
    """Spike threshold for the global gradient norm (std units for zscore, a factor for ratio)."""
    on_spike: Action = "log"
    """What a loss or gradient-norm spike does: log it, skip the update, or stop (checkpoint and
    exit)."""
    on_nonfinite: Literal["skip", "stop"] = "skip"
    """What a NaN/Inf loss or gradient norm does: skip the update, or stop (checkpoint and exit).
    There is no 'log': a non-finite update would destroy the weights."""
    max_consecutive_skips: int = 10
    """Escalate to stop after this many skipped updates in a row (0: never escalate)."""

    def validate(self, problems: ProblemCollector) -> None:
        problems.check(
            self.log_interval >= 1,
            "monitoring.log_interval",
            self.log_interval,
            "must be >= 1",
            "use 1 to log every step",
        )
        problems.check(
            self.activation_stats_interval >= 0,
            "monitoring.activation_stats_interval",
            self.activation_stats_interval,
            "must be >= 0",
            "use 0 to turn statistics off",
        )
        problems.check(
            self.spike_window >= 2,
            "monitoring.spike_window",
            self.spike_window,
            "must be >= 2 (a standard deviation needs two values)",
            "use e.g. 100",
        )
        problems.check(
            1 <= self.spike_min_steps <= self.spike_window,
            "monitoring.spike_min_steps",
            self.spike_min_steps,
            f"must be in [1, spike_window={self.spike_window}]",
            "use e.g. 20",
        )
        for name in ("loss_spike_threshold", "grad_norm_spike_threshold"):
            value = getattr(self, name)
            rule_ok = value > 1.0 if self.spike_method == "ratio" else value > 0.0
            problems.check(
                rule_ok,
                f"monitoring.{name}",
                value,
                "must be > 1 for spike_method=ratio and > 0 for zscore",
                "use e.g. 6 (zscore) or 3 (ratio)",
            )
        if self.peak_flops_per_gpu is not None:
            problems.check(
                self.peak_flops_per_gpu > 0,
                "monitoring.peak_flops_per_gpu",
                self.peak_flops_per_gpu,
                "must be positive (FLOP/s)",
                "e.g. 989e12 for an H100 SXM in bf16, or null to look it up",
            )
        problems.check(
            self.max_consecutive_skips >= 0,
            "monitoring.max_consecutive_skips",
            self.max_consecutive_skips,
            "must be >= 0",
            "use 0 to never escalate",
        )
        problems.check(
            bool(self.wandb_project),
            "monitoring.wandb_project",
            self.wandb_project,
            "must not be empty",
            "name the wandb project",
        )
