"""AdamW whose update also writes the model's bf16 copy of each weight (one pass instead of two).

With mixed precision megatron-core's optimizer keeps fp32 main weights and, after every update,
copies them into the model's bf16 weights (``_copy_main_params_to_model_params``): a second pass
over all of them that reads the fp32 weights the update has just written. For the 1.09B model on
an H100 that copy is one ``bfloat16_copy_kernel_cuda`` of 2.4 ms per step (6.5 GB read and
written), next to torch's fused AdamW update of 11.8 ms. Transformer Engine's fused Adam writes
the model's copy inside its update (megatron-core's precision-aware optimizer); torch's does not.

``install`` gives megatron-core's torch AdamW fallback an update that does, for each weight, in
one kernel: AdamW as torch's fused kernel computes it (decoupled weight decay, bias-corrected
moments, fp32 math, ``step`` kept on the weight's device), then the cast of the new weight into
the model's bf16 weight (into the shard of DDP's parameter buffer with the distributed optimizer).
megatron-core's copy that follows every update is then skipped: there is nothing left to copy.

The update is ``adamw_update_``, compiled by Inductor on CUDA into one pointwise kernel per weight
(dynamic shapes: one compiled graph serves every weight; the learning rate and the other
hyper-parameters are a device tensor, so a new learning rate is no recompilation). Elsewhere it
runs eagerly (the same arithmetic in several passes), which is what the CPU tests exercise.
The optimizer state is torch AdamW's own (``step``, ``exp_avg``, ``exp_avg_sq``), so checkpoints
are the same with and without it and a resume may switch either way.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor

logger = logging.getLogger(__name__)


def adamw_update_(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: Tensor,
    hyper: Tensor,
    grad_scale: Tensor | None,
    model_param: Tensor | None,
) -> None:
    """One AdamW step of the fp32 ``param`` in place, then ``model_param.copy_(param)``.

    The arithmetic of torch's fused AdamW: ``step`` (a 0-d fp32 tensor) is incremented first;
    ``hyper`` holds ``[lr, beta1, beta2, eps, weight_decay]`` (fp32, on ``param``'s device);
    ``grad_scale`` (a one-element tensor, or None), as in torch's fused kernel: the gradient is
    divided by it and left behind divided (``training.step`` clips this way); ``model_param``
    (any dtype, same number of elements) receives the updated weight, or is None.
    """
    lr, beta1, beta2, eps, weight_decay = hyper.unbind(0)
    step.add_(1)
    if grad_scale is not None:
        grad.copy_(grad / grad_scale)
    decayed = param * (1 - lr * weight_decay)
    new_exp_avg = beta1 * exp_avg + (1 - beta1) * grad
    new_exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * grad * grad
    bias_correction1 = 1 - beta1**step
    bias_correction2_sqrt = torch.sqrt(1 - beta2**step)
    denom = torch.sqrt(new_exp_avg_sq) / bias_correction2_sqrt + eps
    new_param = decayed - (lr / bias_correction1) * new_exp_avg / denom
    exp_avg.copy_(new_exp_avg)
    exp_avg_sq.copy_(new_exp_avg_sq)
    param.copy_(new_param)
    if model_param is not None:
        model_param.copy_(new_param)


def _flat(tensor: Tensor) -> Tensor:
    """A 1-D alias of ``tensor``'s elements. Detached, so that the compiled update sees a plain
    tensor rather than a view of a base of some rank: Dynamo guards on a view's base, and 2-D and
    1-D weights would each get their own graph."""
    return tensor.view(-1).detach()


class AdamWWritingModelParams(torch.optim.AdamW):
    """torch's AdamW whose ``step`` runs ``adamw_update_`` and writes each weight's model copy.

    Not constructed: ``convert`` turns megatron-core's AdamW instance into one (its groups, state
    and every reference to it stay as they are) and sets the attributes below.
    """

    update: Any
    """``adamw_update_``, or the same compiled by Inductor (one kernel per weight, one graph for
    every size)."""

    model_targets: dict[Tensor, Tensor | None]
    """Per fp32 weight, the model's low-precision tensor (or view) it is copied into, or None
    where the model's weight is the fp32 weight itself."""
    wrote_model_params: bool
    """Set by ``step``; cleared by the megatron-core copy it makes redundant."""

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("AdamWWritingModelParams.step: closures are not supported")
        grad_scale = getattr(self, "grad_scale", None)  # set by training.step for the clip
        for group in self.param_groups:
            hyper = None
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self._state_of(param)
                if hyper is None:
                    values = (group["lr"], *group["betas"], group["eps"], group["weight_decay"])
                    # From pageable memory, a non-blocking copy is staged at once and waits for
                    # nothing on the GPU (a blocking one would synchronise the stream).
                    hyper = torch.tensor([float(v) for v in values], dtype=torch.float32)
                    hyper = hyper.to(param.device, non_blocking=True)
                target = self.model_targets[param]
                self.update(
                    _flat(param),
                    _flat(param.grad),
                    _flat(state["exp_avg"]),
                    _flat(state["exp_avg_sq"]),
                    state["step"],
                    hyper,
                    grad_scale,
                    None if target is None else _flat(target),
                )
        self.wrote_model_params = True
        return None

    def _state_of(self, param: Tensor) -> dict:
        """The weight's AdamW state, created as torch's first fused step would create it."""
        state = self.state[param]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=param.device)
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        elif state["step"].device != param.device:  # e.g. restored for torch's unfused update
            state["step"] = state["step"].to(param.device, torch.float32)
        return state


def convert(
    adam: torch.optim.AdamW, targets: dict[Tensor, Tensor | None], compiled: bool
) -> AdamWWritingModelParams:
    """Turn ``adam`` (before its first step) into an ``AdamWWritingModelParams`` writing each of
    its weights into ``targets[weight]``; its groups, state and identity stay."""
    adam.__class__ = AdamWWritingModelParams
    adam._patch_step_function()  # torch's step hooks, as for any optimizer class
    adam.model_targets, adam.wrote_model_params = targets, False
    adam.update = adamw_update_
    if compiled:
        adam.update = torch.compile(adamw_update_, dynamic=True, fullgraph=True)
    return adam


def _distributed_targets(part) -> dict[Tensor, Tensor | None]:
    """Per fp32 main shard of megatron-core's ``DistributedOptimizer``, the shard of DDP's
    parameter buffer that ``_copy_main_params_to_model_params`` copies it into."""
    targets: dict[Tensor, Tensor | None] = {}
    for main_groups, model_groups in (
        (part.shard_fp32_from_float16_groups, part.model_float16_groups),
        (part.shard_fp32_groups, part.model_fp32_groups),
    ):
        for main_group, model_group in zip(main_groups, model_groups, strict=True):
            for main, model_param in zip(main_group, model_group, strict=True):
                world_range = part._get_model_param_range_map(model_param)["gbuf_world_in_bucket"]
                gbuf_index, _, bucket_id = part.model_param_gbuf_map[model_param]
                buffer = part.buffers[gbuf_index].buckets[bucket_id].param_data
                shard = buffer.view(-1)[world_range.start : world_range.end]
                if shard.numel() != main.numel():
                    raise AssertionError("a main shard and its buffer range differ in size")
                same = shard.data_ptr() == main.data_ptr() and shard.dtype == main.dtype
                targets[main] = None if same else shard
    return targets


def _float16_targets(part) -> dict[Tensor, Tensor | None]:
    """Per fp32 main weight of megatron-core's ``Float16OptimizerWithFloat16Params``, the model's
    bf16/fp16 weight (None for weights the model keeps in fp32: those are their own main copy)."""
    targets: dict[Tensor, Tensor | None] = {}
    for model_group, main_group in zip(
        part.float16_groups, part.fp32_from_float16_groups, strict=True
    ):
        for model_param, main in zip(model_group, main_group, strict=True):
            targets[main] = model_param.data
    for group in part.fp32_from_fp32_groups:
        for param in group:
            targets[param] = None
    return targets


def _targets(part) -> dict[Tensor, Tensor | None]:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    if isinstance(part, DistributedOptimizer):
        return _distributed_targets(part)
    return _float16_targets(part)


def _unsupported(part, adam) -> str | None:
    """Why this optimizer part keeps torch's update and megatron-core's copy (None: it need not)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    if type(adam) is not torch.optim.AdamW:
        return f"its inner optimizer is {type(adam).__name__}, not torch's AdamW"
    if not isinstance(part, DistributedOptimizer | Float16OptimizerWithFloat16Params):
        return f"{type(part).__name__} keeps no separate model copy"
    config = part.config
    if getattr(config, "use_precision_aware_optimizer", False):
        return "the precision-aware optimizer writes the model copy itself"
    if getattr(config, "reuse_grad_buf_for_mxfp8_param_ag", False):
        return "MXFP8 parameters are gathered from the gradient buffer"
    if isinstance(part, DistributedOptimizer) and part.ddp_config.use_megatron_fsdp:
        return "megatron FSDP copies its own weights"
    from megatron.core.fp8_utils import is_float8tensor

    model_groups = (
        part.model_float16_groups if isinstance(part, DistributedOptimizer) else part.float16_groups
    )
    if any(is_float8tensor(p) for group in model_groups for p in group):
        return "FP8 model weights are quantised by megatron-core's copy"
    for group in adam.param_groups:
        if group["amsgrad"] or group["maximize"] or group["differentiable"]:
            return "amsgrad, maximize and differentiable are not supported"
    return None


def _skip_copy_after_update(part, adam: AdamWWritingModelParams) -> None:
    """Make megatron-core's copy of the main weights into the model a no-op right after an update
    that wrote them (megatron-core calls it only there); any other call copies as before."""
    copy_main_params_to_model_params = part._copy_main_params_to_model_params

    def copy_unless_written() -> None:
        if adam.wrote_model_params:
            adam.wrote_model_params = False
            return
        copy_main_params_to_model_params()

    part._copy_main_params_to_model_params = copy_unless_written


def install(optimizer: Any, compiled: bool) -> int:
    """Give every torch AdamW inside megatron-core's ``optimizer`` the update that writes the
    model's copy (before the first step). Returns how many fp32 weights it updates; parts it
    cannot serve (see ``_unsupported``) keep torch's update and megatron-core's copy, with a log
    line saying why."""
    covered = 0
    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        adam = getattr(part, "optimizer", None)
        if adam is None or getattr(part, "is_stub_optimizer", False):
            continue
        reason = _unsupported(part, adam)
        if reason is not None:
            logger.info("AdamW update with the model copy not used: %s", reason)
            continue
        targets = _targets(part)
        params = [p for group in adam.param_groups for p in group["params"]]
        if any(p not in targets for p in params):
            raise AssertionError("an AdamW weight without a known model copy")
        _skip_copy_after_update(part, convert(adam, targets, compiled))
        covered += len(params)
    if covered:
        logger.info(
            "AdamW update writes the model's weights itself (%d weights, %s)",
            covered,
            "compiled" if compiled else "eager",
        )
    return covered
