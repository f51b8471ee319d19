"""One optimizer step: forward/backward over all micro-batches through megatron-core's schedules.

The schedule (no pipelining, 1F1B or interleaved 1F1B) is chosen by megatron-core from the parallel
state. Gradient accumulation is the schedule's ``num_microbatches``; the current sequence length of
the curriculum is passed per call, so the pipeline's send/receive shapes follow it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_ext.parallel.init import data_parallel_group_with_context
from megatron_ext.training.fused_param_copy import AdamWWritingModelParams


@dataclass
class StepResult:
    """What one optimizer step produced (``loss`` is the global mean over all tokens)."""

    loss: float | None
    grad_norm: float | None
    skipped: bool
    forward_backward_s: float = 0.0
    """Forward/backward of all micro-batches, pipeline communication and gradient reduction (on
    CUDA the stream's own time: from the step's first kernel to the end of the backward)."""
    optimizer_s: float = 0.0
    """The rest of the step (its wall time less ``forward_backward_s``): gradient norm,
    stability check, clipping and the optimizer update."""


def _loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Mean token loss of one micro-batch (the schedule averages over micro-batches)."""
    losses = output_tensor.float().view(-1)
    mask = loss_mask.float().view(-1)
    loss = torch.sum(losses * mask) / mask.sum().clamp(min=1.0)
    # clone: the schedule divides the returned loss by num_microbatches in place.
    return loss, {"lm loss": loss.detach().clone()}


def forward_step(data_iterator: Iterable[dict[str, torch.Tensor]], model: torch.nn.Module):
    """megatron-core forward_step: ``(output, loss_fn)``; output is per-token loss ``[b, s]``."""
    batch = next(data_iterator)
    output = model(
        input_ids=batch["tokens"],
        position_ids=batch["position_ids"],
        attention_mask=None,
        labels=batch["labels"],
    )
    return output, partial(_loss_func, batch["loss_mask"])


def _to_device(micro_batches: list[dict[str, torch.Tensor]], device: torch.device):
    return [{k: v.to(device, non_blocking=True) for k, v in mb.items()} for mb in micro_batches]


def run_forward_backward(
    model_chunks: list[torch.nn.Module],
    micro_batches: list[dict[str, torch.Tensor]],
    seq_length: int,
    device: torch.device,
    forward_only: bool = False,
) -> list[dict[str, Any]]:
    """Forward (and backward) over ``micro_batches``; returns the last stage's loss dicts."""
    batches = _to_device(micro_batches, device)
    micro_batch_size = batches[0]["tokens"].shape[0]
    if len(model_chunks) > 1:
        data_iterator: Any = [iter(batches) for _ in model_chunks]
    else:
        data_iterator = iter(batches)
    forward_backward = get_forward_backward_func()
    return forward_backward(
        forward_step_func=forward_step,
        data_iterator=data_iterator,
        model=model_chunks if len(model_chunks) > 1 else model_chunks[0],
        num_microbatches=len(batches),
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )


def train_step(
    model_chunks: list[torch.nn.Module],
    optimizer,
    micro_batches: list[dict[str, torch.Tensor]],
    seq_length: int,
    device: torch.device,
    pp_group: torch.distributed.ProcessGroup,
    is_last_stage: bool,
    allow_update: Callable[[float, float], bool] | None = None,
    clip_in_update: bool = True,
) -> StepResult:
    """Zero grads, forward/backward all micro-batches, reduce grads, then clip and update.

    ``allow_update(loss, grad_norm)`` is asked after the gradient norm is known and before any
    weight changes (every rank gets the same loss and norm, so every rank decides the same); when
    it says no, the update is skipped. fp16 overflows are skipped by the loss scaler first.
    ``clip_in_update``: clip inside torch's fused AdamW update where that is the optimizer (see
    ``_clip_to_total_norm``); False clips the gradients first, as megatron-core does.
    """
    clock = _StepClock(device)
    for chunk in model_chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    # The schedule ends with finalize_model_grads (see training.optimizer.attach_schedule_hooks).
    loss_dicts = run_forward_backward(model_chunks, micro_batches, seq_length, device)
    loss_value = mean_loss_value(loss_dicts, device, pp_group, is_last_stage)
    clock.backward_done()
    # The loss is read after the gradient norm: the host prepares the gradients and the norm
    # (megatron-core's per-parameter Python) while the GPU still runs the backward; the norm's
    # read then waits for the backward and the norm. Reading the loss first left the GPU idle
    # while the host did that work.
    result = StepResult(None, None, True)
    found_inf = optimizer.prepare_grads()
    if not found_inf:
        result.grad_norm = float(optimizer.get_grad_norm())
    result.loss = float(loss_value.item())
    if not found_inf and (allow_update is None or allow_update(result.loss, result.grad_norm)):
        scaled_in_update = _clip_to_total_norm(optimizer, result.grad_norm, clip_in_update)
        try:
            result.skipped = not optimizer.step_with_ready_grads()
        finally:
            for adam in scaled_in_update:
                del adam.grad_scale
    result.forward_backward_s, result.optimizer_s = clock.split()
    return result


class _StepClock:
    """Where a step's time went: forward/backward, and the rest (norm, clip, update).

    On a CPU the host's clock is the device's. On CUDA the host runs ahead of the GPU and waits
    only where it reads a value, so the forward/backward time comes from CUDA events on the
    stream (read at the end of the step, when the backward's event has passed), and the rest is
    the host's wall time of the step less it.
    """

    def __init__(self, device: torch.device | str) -> None:
        self._began = time.perf_counter()
        self._host_backward_s = 0.0
        self._events = None
        if torch.device(device).type == "cuda":
            self._events = (
                torch.cuda.Event(enable_timing=True),
                torch.cuda.Event(enable_timing=True),
            )
            self._events[0].record()

    def backward_done(self) -> None:
        self._host_backward_s = time.perf_counter() - self._began
        if self._events is not None:
            self._events[1].record()

    def split(self) -> tuple[float, float]:
        """``(forward_backward_s, rest_s)``; call after a value of the step was read."""
        total = time.perf_counter() - self._began
        if self._events is None:
            backward = self._host_backward_s
        else:
            self._events[1].synchronize()  # passed already: the step read a value after it
            backward = self._events[0].elapsed_time(self._events[1]) / 1000.0
        return backward, max(0.0, total - backward)


def _clip_to_total_norm(
    optimizer, grad_norm: float, in_update: bool = True
) -> list[torch.optim.Optimizer]:
    """Clip every (chained) optimizer's main grads by the one global norm already computed.

    megatron-core's rule: gradients are multiplied by ``clip_grad / (norm + 1e-6)`` when that is
    below 1. Where the update is torch's fused Adam/AdamW, the clip goes into the update kernel
    instead, as its ``grad_scale`` (the AMP unscale input: each gradient is divided by it as it is
    read), which saves a full read and write of the fp32 gradients. Returns those torch
    optimizers; their ``grad_scale`` must be removed after the update (``train_step`` does).
    """
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    scaled_in_update = []
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        if getattr(inner, "is_stub_optimizer", False) or inner.config.clip_grad <= 0.0:
            continue
        parameters = inner.get_parameters()
        if not parameters:
            continue
        clip_coeff = inner.config.clip_grad / (grad_norm + 1.0e-6)
        if clip_coeff >= 1.0:
            continue
        adam = getattr(inner, "optimizer", None)
        if in_update and fuses_grad_scale(adam):
            # A fill kernel, not a host-to-device copy.
            adam.grad_scale = torch.full(
                (1,), 1.0 / clip_coeff, dtype=torch.float32, device=parameters[0].device
            )
            scaled_in_update.append(adam)
        else:
            clip_grad_by_total_norm_fp32(
                parameters, max_norm=inner.config.clip_grad, total_norm=grad_norm
            )
    return scaled_in_update


def fuses_grad_scale(adam) -> bool:
    """Whether ``adam`` is a torch Adam/AdamW whose every group runs the fused kernel, or the
    update that also writes the model's weights (``fused_param_copy``): the updates that take a
    ``grad_scale`` (torch's foreach and per-tensor updates reject one)."""
    if not isinstance(adam, torch.optim.Adam | torch.optim.AdamW) or hasattr(adam, "grad_scale"):
        return False
    return isinstance(adam, AdamWWritingModelParams) or all(
        group.get("fused") for group in adam.param_groups
    )


def mean_loss(
    loss_dicts: list[dict[str, Any]],
    device: torch.device,
    pp_group: torch.distributed.ProcessGroup,
    is_last_stage: bool,
) -> float:
    """Mean micro-batch loss over the data-parallel group, broadcast from the last stage."""
    return float(mean_loss_value(loss_dicts, device, pp_group, is_last_stage).item())


def mean_loss_value(
    loss_dicts: list[dict[str, Any]],
    device: torch.device,
    pp_group: torch.distributed.ProcessGroup,
    is_last_stage: bool,
) -> torch.Tensor:
    """``mean_loss`` as a one-element float64 tensor on ``device``, not yet read by the host."""
    value = torch.zeros(1, dtype=torch.float64, device=device)
    if is_last_stage:
        value += torch.stack([d["lm loss"].double() for d in loss_dicts]).mean()
        dp_cp_group = data_parallel_group_with_context()
        torch.distributed.all_reduce(value, group=dp_cp_group)
        value /= dp_cp_group.size()
    # Every rank reports the same loss: the last stage owns it, the others receive it.
    last_rank = torch.distributed.get_global_rank(pp_group, pp_group.size() - 1)
    torch.distributed.broadcast(value, src=last_rank, group=pp_group)
    return value
