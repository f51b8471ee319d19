"""Loss and gradient-norm spike detection and the per-step decision: apply, skip or stop.

The detectors only see global values (the loss averaged over data-parallel ranks and broadcast
along the pipeline, the gradient norm all-reduced by the optimizer), so every rank reaches the same
decision; ``StabilityGuard.decide`` also agrees the action across ranks when a process group exists.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Literal

from megatron_ext.monitoring.config import MonitoringConfig

StepAction = Literal["apply", "skip", "stop"]
_ORDER = {"apply": 0, "skip": 1, "stop": 2}


@dataclass(frozen=True)
class Decision:
    """What the loop does with this step's update, and why (empty reason: nothing happened)."""

    action: StepAction
    reason: str = ""

    @property
    def apply_update(self) -> bool:
        return self.action == "apply"


class SpikeDetector:
    """Flags values far above a running window of recent values.

    zscore: ``value > mean + threshold * std`` (std floored at 0.1% of |mean|, so a nearly constant
    window does not flag noise); ratio: ``value > threshold * mean``. Detection starts once the
    window holds ``min_steps`` values. Every finite value enters the window, spikes included, so a
    lasting level shift stops being reported after a while instead of skipping steps forever.
    """

    def __init__(self, window: int, threshold: float, min_steps: int, method: str = "zscore"):
        if method not in ("zscore", "ratio"):
            raise ValueError(f"unknown spike method {method!r}; use 'zscore' or 'ratio'")
        self.values: deque[float] = deque(maxlen=window)
        self.threshold = threshold
        self.min_steps = min_steps
        self.method = method

    def check(self, value: float) -> str:
        """Record ``value``; return a reason string when it is a spike, else ''."""
        if not math.isfinite(value):
            return ""
        reason = ""
        if len(self.values) >= self.min_steps:
            mean = sum(self.values) / len(self.values)
            if self.method == "zscore":
                var = sum((v - mean) ** 2 for v in self.values) / (len(self.values) - 1)
                std = max(math.sqrt(var), 1e-3 * abs(mean), 1e-12)
                score = (value - mean) / std
                if score > self.threshold:
                    reason = f"{value:.6g} is {score:.1f} std above the window mean {mean:.6g}"
            elif mean > 0 and value > self.threshold * mean:
                reason = f"{value:.6g} is {value / mean:.2f}x the window mean {mean:.6g}"
        self.values.append(value)
        return reason


class StabilityGuard:
    """Turns loss, gradient norm and overflow flags into a ``Decision`` following the config."""

    def __init__(self, cfg: MonitoringConfig):
        self.cfg = cfg
        self.loss = SpikeDetector(
            cfg.spike_window, cfg.loss_spike_threshold, cfg.spike_min_steps, cfg.spike_method
        )
        self.grad_norm = SpikeDetector(
            cfg.spike_window, cfg.grad_norm_spike_threshold, cfg.spike_min_steps, cfg.spike_method
        )
        self.consecutive_skips = 0
        self.num_skipped = 0
        self.num_spikes = 0
        self.num_nonfinite = 0

    def decide(
        self,
        loss: float | None,
        grad_norm: float | None,
        found_inf: bool = False,
        agree: bool = True,
    ) -> Decision:
        """Decide for one step; ``found_inf`` is the fp16 loss scaler's overflow flag.

        A loss-scale overflow always skips (the scaler already lowered the scale) and does not
        count towards ``max_consecutive_skips``. With ``agree`` and an initialised process group
        the most severe action over all ranks wins, so no rank stops alone.
        """
        decision = self._local_decision(loss, grad_norm, found_inf)
        if agree:
            decision = _agree(decision)
        if decision.action == "skip" and not found_inf:
            self.consecutive_skips += 1
            limit = self.cfg.max_consecutive_skips
            if limit and self.consecutive_skips >= limit:
                decision = Decision(
                    "stop", f"{decision.reason}; {self.consecutive_skips} updates skipped in a row"
                )
        elif decision.action == "apply":
            self.consecutive_skips = 0
        if decision.action == "skip":
            self.num_skipped += 1
        return decision

    def state_dict(self) -> dict:
        """The spike windows and counters (plain floats and ints): a checkpoint stores them, so a
        resumed run detects spikes from its first step and counts skips on, as if never stopped."""
        return {
            "loss_window": list(self.loss.values),
            "grad_norm_window": list(self.grad_norm.values),
            "consecutive_skips": self.consecutive_skips,
            "num_skipped": self.num_skipped,
            "num_spikes": self.num_spikes,
            "num_nonfinite": self.num_nonfinite,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict`` output; windows keep their newest values if the configured
        window is now shorter."""
        self.loss.values.extend(float(v) for v in state["loss_window"])
        self.grad_norm.values.extend(float(v) for v in state["grad_norm_window"])
        for name in ("consecutive_skips", "num_skipped", "num_spikes", "num_nonfinite"):
            setattr(self, name, int(state[name]))

    def _local_decision(
        self, loss: float | None, grad_norm: float | None, found_inf: bool
    ) -> Decision:
        nonfinite = [
            f"{name} is {value}"
            for name, value in (("loss", loss), ("grad_norm", grad_norm))
            if value is not None and not math.isfinite(value)
        ]
        if nonfinite:
            self.num_nonfinite += 1
            return Decision(self.cfg.on_nonfinite, "non-finite " + ", ".join(nonfinite))
        if found_inf:
            return Decision("skip", "fp16 loss-scale overflow (inf/nan gradients)")
        spikes = []
        if loss is not None and (why := self.loss.check(loss)):
            spikes.append(f"loss spike: {why}")
        if grad_norm is not None and (why := self.grad_norm.check(grad_norm)):
            spikes.append(f"grad_norm spike: {why}")
        if not spikes:
            return Decision("apply")
        self.num_spikes += 1
        action = {"log": "apply", "skip": "skip", "stop": "stop"}[self.cfg.on_spike]
        return Decision(action, "; ".join(spikes))


def _agree(decision: Decision) -> Decision:
    """The most severe action over all ranks (a no-op without a process group)."""
    import torch
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return decision
    on_gpu = "nccl" in str(dist.get_backend())
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    code = torch.tensor([_ORDER[decision.action]], dtype=torch.int32, device=device)
    dist.all_reduce(code, op=dist.ReduceOp.MAX)
    action = next(name for name, value in _ORDER.items() if value == int(code.item()))
    if action == decision.action:
        return decision
    return Decision(action, decision.reason or "another rank decided to " + action)  # type: ignore[arg-type]
