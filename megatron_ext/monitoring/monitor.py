"""``TrainingMonitor``: the one object the training loop talks to about metrics and stability.

Per step, on every rank (the calls with collectives must be made by all ranks alike):

    monitor.start_step(step)                  # statistics step? hooks + parameter snapshot
    result = train_step(..., allow_update=monitor.update_gate(step, loss_scale))
    record = monitor.end_step(step, scalars, timings)   # derived scalars, reductions, sinks
    if monitor.stop_requested: save a checkpoint and exit
    ...
    monitor.close()

``train_step`` (megatron_ext.training.step) runs megatron-core's optimizer step in its parts:
``prepare_grads()`` (grads -> main grads; fp16: unscale and inf check, which skips by itself),
``get_grad_norm()`` (global, identical on every rank), then ``allow_update(loss, grad_norm)``, and
only when that says yes clips with that norm (inside torch's fused AdamW update, where that is
the optimizer) and calls ``step_with_ready_grads()``. So a refused update never touches weights or
optimizer state. The gate also records the per-layer gradient norms, because at that point the
gradient buffers hold the reduced, not yet clipped, gradients.

Only the logging rank writes files. ``end_step`` returns the step's record on every rank.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from megatron_ext.models.config import ModelConfig
from megatron_ext.monitoring.activations import (
    ActivationStats,
    flatten_layer_stats,
    grad_sq_sums,
    reduce_layer_stats,
)
from megatron_ext.monitoring.config import MonitoringConfig
from megatron_ext.monitoring.flops import detect_peak_flops, flops_breakdown, mfu
from megatron_ext.monitoring.model_view import owned_parts, transformer_layers, unwrap
from megatron_ext.monitoring.norms import ParamSnapshot, param_norm
from megatron_ext.monitoring.sinks import JsonlSink, SinkSet, TensorBoardSink, WandbSink
from megatron_ext.monitoring.stability import Decision, StabilityGuard

logger = logging.getLogger(__name__)
_GIB = 1024**3


class TrainingMonitor:
    """Scalars, per-layer statistics, stability decisions and sinks for one training run."""

    def __init__(
        self,
        cfg: MonitoringConfig,
        run_dir: str | Path,
        ctx: Any,
        model_chunks: list[torch.nn.Module],
        model_cfg: ModelConfig,
        run_config: dict | None = None,
    ):
        """``ctx``: the ``ParallelContext``; ``model_chunks``: this rank's chunks as wrapped by
        megatron DDP (the gradient norms read DDP's reduced buffers; unwrapped chunks only work
        without data parallelism); ``run_config``: the resolved experiment config for wandb."""
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.ctx = ctx
        self.model_cfg = model_cfg
        self.device = ctx.torch_device
        self.num_gpus = ctx.layout.world_size
        self.vocab_size = model_cfg.padded_vocab_size(ctx.layout.tp)
        sequence_parallel = bool(unwrap(model_chunks[0]).config.sequence_parallel)
        self.parts = owned_parts(model_chunks, ctx.tp_rank, ctx.dp_rank)
        self.activations = ActivationStats(
            transformer_layers(model_chunks),
            model_cfg.num_layers,
            counts_activations=sequence_parallel or ctx.tp_rank == 0,
            device=self.device,
        )
        self.guard = StabilityGuard(cfg)
        peak, self.device_name = detect_peak_flops(ctx.device)
        self.peak_flops = cfg.peak_flops_per_gpu if cfg.peak_flops_per_gpu is not None else peak
        self._snapshot: ParamSnapshot | None = None
        self._stats_active = False
        self._grad_sq: torch.Tensor | None = None
        self._decision: Decision | None = None
        self.last_layer_stats: dict[str, Any] | None = None
        """The per-layer statistics of the latest statistics step (identical on every rank)."""
        self.every_step = SinkSet()
        self.periodic = SinkSet()
        if ctx.is_logging_rank:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.every_step.add("jsonl", lambda: JsonlSink(self.run_dir))
            if cfg.tensorboard:
                self.periodic.add("tensorboard", lambda: TensorBoardSink(self.run_dir))
            if cfg.wandb:
                self.periodic.add(
                    "wandb",
                    lambda: WandbSink(
                        self.run_dir,
                        cfg.wandb_project,
                        cfg.wandb_run_name,
                        cfg.wandb_mode,
                        run_config,
                    ),
                )

    def stats_due(self, step: int) -> bool:
        interval = self.cfg.activation_stats_interval
        return interval > 0 and step % interval == 0

    def start_step(self, step: int) -> bool:
        """Before the forward passes: on statistics steps attach the hooks and snapshot the
        parameters (for the update-to-weight ratio). Returns whether this is a statistics step."""
        self._decision = None
        self._grad_sq = None
        self._stats_active = self.stats_due(step)
        if not self._stats_active:
            return False
        self.activations.attach()
        self._snapshot = ParamSnapshot(self.parts)
        return True

    def update_gate(self, step: int, loss_scale: float = 1.0) -> Callable[[float, float], bool]:
        """The ``allow_update(loss, grad_norm)`` callback of ``train_step`` for this step.

        It records the per-layer gradient norms (statistics steps), asks ``check_step`` and
        answers whether to apply the update. ``loss_scale``: the fp16 loss scale the gradients
        were computed with (read it before the step; 1 for bf16/fp32)."""

        def allow_update(loss: float, grad_norm: float) -> bool:
            self.record_gradients(step, loss_scale)
            return self.check_step(step, loss, grad_norm).apply_update

        return allow_update

    @property
    def stop_requested(self) -> bool:
        """The latest decision was 'stop': the loop should save a checkpoint and exit."""
        return self._decision is not None and self._decision.action == "stop"

    @property
    def last_decision(self) -> Decision | None:
        return self._decision

    def forward_backward_done(self) -> None:
        """The step's forward and backward passes are over: stop recording activations, so that
        an evaluation before ``end_step`` is not counted. ``record_gradients`` does it too, but
        an fp16 overflow skips the update gate that calls it."""
        self.activations.detach()

    def record_gradients(self, step: int, loss_scale: float = 1.0) -> None:
        """After ``finish_grad_sync`` and before clipping (which scales the buffers in place):
        keep this rank's per-layer squared gradient sums. ``loss_scale``: the fp16 scale still
        in them."""
        if self.stats_due(step):
            # The forward passes are over: an evaluation before end_step must not be counted.
            self.activations.detach()
            self._grad_sq = grad_sq_sums(self.parts, self.model_cfg.num_layers, self.device)
            if loss_scale != 1.0:
                self._grad_sq /= float(loss_scale) ** 2

    def state_dict(self) -> dict:
        """What a checkpoint keeps of the monitor: the stability guard's windows and counters."""
        return {"stability": self.guard.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.guard.load_state_dict(state["stability"])

    def check_step(
        self, step: int, loss: float | None, grad_norm: float | None, found_inf: bool = False
    ) -> Decision:
        """The stability decision for this step's update (see ``StabilityGuard.decide``)."""
        decision = self.guard.decide(loss, grad_norm, found_inf)
        if decision.reason and self.ctx.is_logging_rank:
            logger.warning("step %d: %s -> %s", step, decision.reason, decision.action)
        self._decision = decision
        return decision

    def end_step(
        self, step: int, scalars: dict[str, Any], timings: dict[str, float]
    ) -> dict[str, Any]:
        """Add derived scalars, reduce statistics (collectives on all ranks), write the sinks.

        ``scalars``: loss, grad_norm, lr, loss_scale, seq_length, global_batch_size,
        num_microbatches, consumed_tokens, ... (``num_tokens`` overrides batch x seq_length);
        ``timings``: seconds, ``step_time`` required for throughput, others (data_wait,
        forward_backward, optimizer, ...) are written as ``<name>_ms``.
        """
        record: dict[str, Any] = {"step": step, **scalars}
        for name, seconds in timings.items():
            record[f"{name}_ms"] = 1000.0 * seconds
        record.update(self.throughput(scalars, timings))
        record.update(self._memory())
        if self._decision is not None:
            record.setdefault("skipped", not self._decision.apply_update)
            if self._decision.reason:
                record["stability"] = f"{self._decision.action}: {self._decision.reason}"
        periodic = step % self.cfg.log_interval == 0
        if periodic:
            record["param_norm"] = param_norm(self.parts, self.device)
        layer_stats = None
        if self._stats_active:
            layer_stats = self._finish_layer_stats(record)
            self.last_layer_stats = layer_stats
        self.every_step.write(step, record)
        if periodic:
            self.periodic.write(step, record)
        if layer_stats is not None:
            flat = flatten_layer_stats(layer_stats)
            self.every_step.write_layer_stats(step, layer_stats, flat)
            self.periodic.write_layer_stats(step, layer_stats, flat)
        return record

    def throughput(self, scalars: dict[str, Any], timings: dict[str, float]) -> dict[str, float]:
        """tokens/s (global and per GPU), model TFLOP/s per GPU and MFU from the step time."""
        step_time = timings.get("step_time")
        seq_length = scalars.get("seq_length")
        tokens = scalars.get("num_tokens")
        if tokens is None and seq_length is not None and "global_batch_size" in scalars:
            tokens = scalars["global_batch_size"] * seq_length
        if not step_time or step_time <= 0 or tokens is None or seq_length is None:
            return {}
        tokens_per_s = tokens / step_time
        flops = flops_breakdown(self.model_cfg, int(seq_length), self.vocab_size)
        out = {
            "tokens_per_s": tokens_per_s,
            "tokens_per_s_per_gpu": tokens_per_s / self.num_gpus,
            "tflops_per_gpu": flops.total * tokens_per_s / self.num_gpus / 1e12,
        }
        if self.peak_flops:
            out["mfu"] = mfu(flops.total, tokens_per_s, self.num_gpus, self.peak_flops)
        return out

    def _memory(self) -> dict[str, float]:
        if self.device.type != "cuda":
            return {}
        out = {
            "mem_allocated_gib": torch.cuda.memory_allocated() / _GIB,
            "mem_reserved_gib": torch.cuda.memory_reserved() / _GIB,
            "mem_peak_gib": torch.cuda.max_memory_allocated() / _GIB,
        }
        torch.cuda.reset_peak_memory_stats()
        return out

    def _finish_layer_stats(self, record: dict[str, Any]) -> dict[str, Any]:
        self._stats_active = False
        self.activations.detach()
        if self._snapshot is not None:
            _, _, ratio = self._snapshot.update_ratio(self.device)
            record["update_to_weight"] = ratio
            self._snapshot = None
        stats = reduce_layer_stats(self.activations.sums, self.activations.maxes, self._grad_sq)
        self._grad_sq = None
        return stats

    @property
    def sink_failures(self) -> dict[str, str]:
        return {**self.every_step.failures, **self.periodic.failures}

    def close(self) -> None:
        """Remove hooks and close the sinks (flushes TensorBoard, finishes the wandb run)."""
        self.activations.detach()
        self.every_step.close()
        self.periodic.close()


def format_record(record: dict[str, Any]) -> str:
    """A one-line console summary of a step record."""
    parts = [f"step {record['step']}"]
    for key, fmt in (
        ("loss", "loss {:.4f}"),
        ("grad_norm", "gnorm {:.3f}"),
        ("lr", "lr {:.3e}"),
        ("tokens_per_s", "{:.0f} tok/s"),
        ("tflops_per_gpu", "{:.1f} TFLOP/s/GPU"),
        ("mfu", "MFU {:.1%}"),
        ("mem_peak_gib", "peak {:.1f} GiB"),
    ):
        value = record.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            parts.append(fmt.format(value))
    if record.get("stability"):
        parts.append(f"[{record['stability']}]")
    return " | ".join(parts)
