"""Parallel layout configuration: degrees, device and megatron-core's DDP switches."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from megatron_ext.config.errors import ProblemCollector


@dataclass(kw_only=True)
class ParallelConfig:
    """How the model and batch are split across processes."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    """`auto` picks cuda when a GPU is visible, else cpu (gloo + the CPU compatibility layer)."""
    tensor_model_parallel_size: int = 1
    """Tensor-parallel degree (keep it inside one NVLink domain, at most 8 on H100 SXM nodes)."""
    pipeline_model_parallel_size: int = 1
    """Number of pipeline stages."""
    virtual_pipeline_model_parallel_size: int | None = None
    """Model chunks per pipeline stage for the interleaved schedule (None: plain 1F1B)."""
    context_parallel_size: int = 1
    """Context-parallel degree. Only 1 is accepted: the batches and the loss are not cut per
    context-parallel rank yet (and it needs Transformer Engine attention)."""
    sequence_parallel: bool = False
    """Shard LayerNorm/dropout activations along the sequence across the TP group (needs TP > 1)."""
    use_distributed_optimizer: bool = True
    """Shard optimizer state across data-parallel ranks (ZeRO-1 style)."""
    overlap_grad_reduce: bool = False
    """Overlap the data-parallel gradient reduce-scatter with backward compute."""
    overlap_param_gather: bool = False
    """Overlap the parameter all-gather with the next forward (needs the distributed optimizer)."""
    distributed_timeout_minutes: int = 30
    """Timeout of collective operations."""

    def validate(self, problems: ProblemCollector, world_size: int | None = None) -> None:
        degrees = {
            "tensor_model_parallel_size": self.tensor_model_parallel_size,
            "pipeline_model_parallel_size": self.pipeline_model_parallel_size,
            "context_parallel_size": self.context_parallel_size,
        }
        for name, value in degrees.items():
            problems.check(value >= 1, f"parallel.{name}", value, "must be >= 1", "use 1 or more")
        problems.check(
            self.context_parallel_size <= 1,
            "parallel.context_parallel_size",
            self.context_parallel_size,
            "context parallelism is not supported: each context-parallel rank would need its own "
            "slice of every sequence and a loss reduced over the context-parallel group, which "
            "megatron_ext's batches and loss do not do yet (every rank would train on whole "
            "sequences as if they were slices)",
            "use context_parallel_size=1 (tensor, pipeline and data parallelism and activation "
            "recompute fit the recipe's context of 8,192)",
        )
        vpp = self.virtual_pipeline_model_parallel_size
        if vpp is not None:
            problems.check(
                vpp >= 2 and self.pipeline_model_parallel_size >= 2,
                "parallel.virtual_pipeline_model_parallel_size",
                vpp,
                "interleaving needs >= 2 chunks per stage and >= 2 pipeline stages",
                "set it to null, or to 2+ together with pipeline_model_parallel_size >= 2",
            )
        problems.check(
            not self.sequence_parallel or self.tensor_model_parallel_size > 1,
            "parallel.sequence_parallel",
            self.sequence_parallel,
            "sequence parallelism shards activations across the TP group, which needs TP > 1",
            "set parallel.sequence_parallel=false or tensor_model_parallel_size >= 2",
        )
        problems.check(
            not self.overlap_param_gather or self.use_distributed_optimizer,
            "parallel.overlap_param_gather",
            self.overlap_param_gather,
            "parameter all-gather only exists with the distributed optimizer",
            "set parallel.use_distributed_optimizer=true or overlap_param_gather=false",
        )
        if world_size is not None:
            model_parallel = (
                self.tensor_model_parallel_size
                * self.pipeline_model_parallel_size
                * self.context_parallel_size
            )
            problems.check(
                model_parallel > 0 and world_size % model_parallel == 0,
                "parallel.tensor_model_parallel_size",
                self.tensor_model_parallel_size,
                f"world size {world_size} is not divisible by TP*PP*CP = {model_parallel}",
                "choose degrees whose product divides the number of processes",
            )
