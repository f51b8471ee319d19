"""AdamW configuration and construction through megatron-core's optimizer factory."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig as McoreOptimizerConfig
from megatron.core.optimizer import get_megatron_optimizer

from megatron_ext.checkpoint.manager import torch_adams
from megatron_ext.config.errors import ProblemCollector
from megatron_ext.models.config import TORCH_DTYPES, PrecisionConfig
from megatron_ext.models.fast_path import resolve_switch
from megatron_ext.parallel.config import ParallelConfig
from megatron_ext.training import fused_param_copy, multi_tensor


@dataclass(kw_only=True)
class OptimizerConfig:
    """AdamW as in the recipe: betas (0.9, 0.95), weight decay 0.1 (not on norms and biases)."""

    adam_beta1: float = 0.9
    """First-moment decay."""
    adam_beta2: float = 0.95
    """Second-moment decay."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    weight_decay: float = 0.1
    """Decoupled weight decay on matrices (1-D parameters, i.e. norms and biases, get none)."""
    clip_grad: float = 1.0
    """Clip the global gradient norm to this value (0 disables clipping)."""
    fused_adamw: bool = True
    """Use torch's fused AdamW kernel (the whole update in one kernel per device and dtype) where
    megatron-core falls back to torch's AdamW, i.e. without Transformer Engine and apex (with
    either, megatron-core uses their fused Adam and this field has no effect). False leaves the
    choice to torch (the multi-tensor foreach update on GPU). The choice is the run's, not the
    checkpoint's: a resume keeps the configured kernel whatever the saving run used."""
    fused_param_copy: Literal["auto", "on", "off"] = "auto"
    """Where megatron-core falls back to torch's AdamW with mixed precision: ``on`` makes the
    update also write the model's bf16 copy of each weight, in the same kernel (compiled by
    Inductor on CUDA; eager elsewhere), instead of megatron-core copying all fp32 weights again
    after the update. ``auto``: on with ``fused_adamw`` on CUDA. ``off``: torch's update and
    megatron-core's copy. The optimizer state is the same either way (a resume may switch)."""

    def validate(self, problems: ProblemCollector) -> None:
        for name in ("adam_beta1", "adam_beta2"):
            value = getattr(self, name)
            problems.check(
                0.0 <= value < 1.0,
                f"optimizer.{name}",
                value,
                "must be in [0, 1)",
                "use e.g. 0.9 / 0.95",
            )
        problems.check(
            self.weight_decay >= 0,
            "optimizer.weight_decay",
            self.weight_decay,
            "must be >= 0",
            "use 0.1 as in the recipe",
        )
        problems.check(
            self.clip_grad >= 0,
            "optimizer.clip_grad",
            self.clip_grad,
            "must be >= 0",
            "use 1.0, or 0 to disable clipping",
        )


def wrap_ddp(
    chunks: list[torch.nn.Module],
    parallel: ParallelConfig,
    precision: PrecisionConfig,
) -> list[DistributedDataParallel]:
    """Wrap each model chunk in megatron-core's DDP (contiguous grad buffers, bucketed reduce)."""
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=precision.grad_reduce_in_fp32,
        overlap_grad_reduce=parallel.overlap_grad_reduce,
        overlap_param_gather=parallel.overlap_param_gather,
        use_distributed_optimizer=parallel.use_distributed_optimizer,
        check_for_nan_in_grad=False,
    )
    return [
        DistributedDataParallel(
            config=chunk.config,
            ddp_config=ddp_config,
            module=chunk,
            # Megatron-LM's convention: only the first chunk buckets, so that with the interleaved
            # schedule the reduce of later chunks does not wait on a shared bucket.
            disable_bucketing=index > 0,
        )
        for index, chunk in enumerate(chunks)
    ]


def build_optimizer(
    ddp_chunks: list[DistributedDataParallel],
    optim: OptimizerConfig,
    parallel: ParallelConfig,
    precision: PrecisionConfig,
    peak_lr: float,
    min_lr: float,
):
    """megatron-core's (distributed) AdamW: fp32 main weights, optional dynamic loss scale."""
    config = McoreOptimizerConfig(
        optimizer="adam",
        lr=peak_lr,
        min_lr=min_lr,
        weight_decay=optim.weight_decay,
        adam_beta1=optim.adam_beta1,
        adam_beta2=optim.adam_beta2,
        adam_eps=optim.adam_eps,
        clip_grad=optim.clip_grad,
        bf16=precision.dtype == "bf16",
        fp16=precision.dtype == "fp16",
        params_dtype=TORCH_DTYPES[precision.dtype],
        initial_loss_scale=precision.initial_loss_scale,
        min_loss_scale=precision.min_loss_scale,
        loss_scale_window=precision.loss_scale_window,
        hysteresis=precision.hysteresis,
        use_distributed_optimizer=parallel.use_distributed_optimizer,
        overlap_param_gather=parallel.overlap_param_gather,
    )
    multi_tensor.install()  # gradient norm and clip without per-tensor host syncs or copies
    optimizer = get_megatron_optimizer(config, ddp_chunks)
    if optim.fused_adamw:
        _use_fused_torch_adam(optimizer)
    on_cuda = any(p.is_cuda for chunk in ddp_chunks for p in chunk.parameters())
    if _copy_in_update(optim, on_cuda):
        fused_param_copy.install(optimizer, compiled=on_cuda)
    return optimizer


def _copy_in_update(optim: OptimizerConfig, on_cuda: bool) -> bool:
    """``optimizer.fused_param_copy`` resolved: ``auto`` is on with the fused AdamW on CUDA."""
    return resolve_switch(
        optim.fused_param_copy, optim.fused_adamw and on_cuda, "optimizer.fused_param_copy"
    )


def _use_fused_torch_adam(optimizer) -> None:
    """Switch megatron-core's torch AdamW fallback (if it is one) to the fused kernel.

    Done before the first step: torch creates each parameter's state (with ``step`` on the
    parameter's device for the fused kernel) at its first update.
    """
    for adam in torch_adams(optimizer):
        for group in adam.param_groups:
            group["foreach"] = False
            group["fused"] = True
        adam.defaults.update(foreach=False, fused=True)


def prepare_for_training(
    chunks: list[torch.nn.Module],
    parallel: ParallelConfig,
    precision: PrecisionConfig,
    optim: OptimizerConfig,
    peak_lr: float,
    min_lr: float,
) -> tuple[list[DistributedDataParallel], object]:
    """Built model chunks -> ``(ddp_chunks, optimizer)`` ready for ``train_step``: each chunk
    under DDP, the (distributed) AdamW over them, and the schedule hooks attached."""
    ddp_chunks = wrap_ddp(chunks, parallel, precision)
    optimizer = build_optimizer(ddp_chunks, optim, parallel, precision, peak_lr, min_lr)
    attach_schedule_hooks(ddp_chunks, optimizer, parallel)
    return ddp_chunks, optimizer


def current_loss_scale(optimizer) -> float:
    """The loss scale the next step's gradients will carry: the dynamic fp16 scale, read from the
    device; 1.0 without reading anything where no scaler is used (bf16, fp32), so that asking for
    it costs no host synchronisation every step."""
    parts = getattr(optimizer, "chained_optimizers", [optimizer])
    if all(getattr(part, "grad_scaler", None) is None for part in parts):
        return 1.0
    return float(optimizer.get_loss_scale().item())


def attach_schedule_hooks(
    ddp_chunks: list[DistributedDataParallel], optimizer, parallel: ParallelConfig
) -> None:
    """Give megatron-core's schedules the hooks that finish gradients and scale the loss.

    ``finalize_model_grads`` completes the data-parallel gradient reduction, sums the gradients of
    sequence-parallel norm weights across the TP group and of shared embeddings across stages;
    ``scale_loss`` applies the fp16 loss scale to the backward; ``no_sync`` keeps DDP from reducing
    after every micro-batch; ``start_grad_sync`` / ``start_param_sync`` overlap communication with
    compute when those switches are on.
    """
    from megatron.core.distributed import finalize_model_grads

    config = ddp_chunks[0].config
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    no_sync = [chunk.no_sync for chunk in ddp_chunks]
    config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
    if parallel.overlap_grad_reduce:
        sync = [chunk.start_grad_sync for chunk in ddp_chunks]
        config.grad_sync_func = sync[0] if len(sync) == 1 else sync
    if parallel.overlap_param_gather:
        param_sync = [chunk.start_param_sync for chunk in ddp_chunks]
        config.param_sync_func = param_sync[0] if len(param_sync) == 1 else param_sync
