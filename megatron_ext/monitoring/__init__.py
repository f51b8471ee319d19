"""Training metrics: scalars and MFU, per-layer activation statistics, stability, sinks, plots.

The training loop builds one ``TrainingMonitor`` and calls it around every step (``monitor.py``
shows the call sequence); docs/monitoring.md describes every metric.
"""

from megatron_ext.monitoring.config import MonitoringConfig
from megatron_ext.monitoring.flops import flops_breakdown, mfu, model_flops_per_token
from megatron_ext.monitoring.monitor import TrainingMonitor, format_record
from megatron_ext.monitoring.stability import Decision, SpikeDetector, StabilityGuard

__all__ = [
    "Decision",
    "MonitoringConfig",
    "SpikeDetector",
    "StabilityGuard",
    "TrainingMonitor",
    "flops_breakdown",
    "format_record",
    "mfu",
    "model_flops_per_token",
]
