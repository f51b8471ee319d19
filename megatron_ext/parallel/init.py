"""Process-group and megatron-core parallel-state set-up and tear-down.

This is the one module that talks to ``megatron.core.parallel_state``: the rest of megatron_ext gets
what it needs (ranks, groups, the layout) from the ``ParallelContext`` returned here.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from megatron_ext.parallel.config import ParallelConfig
from megatron_ext.parallel.cpu_compat import activate_device
from megatron_ext.parallel.layout import ParallelLayout
from megatron_ext.parallel.ports import find_free_port


@dataclass(frozen=True)
class ParallelContext:
    """What the rest of the code needs to know about this process's place in the layout."""

    layout: ParallelLayout
    device: str
    rank: int
    local_rank: int
    tp_rank: int
    pp_rank: int
    dp_rank: int

    @property
    def is_logging_rank(self) -> bool:
        """The rank that writes logs: last pipeline stage (it has the loss), TP and DP rank 0."""
        return self.tp_rank == 0 and self.dp_rank == 0 and self.pp_rank == self.layout.pp - 1

    @property
    def torch_device(self) -> torch.device:
        if self.device == "cuda":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def dp_group(self) -> dist.ProcessGroup:
        from megatron.core import parallel_state

        return parallel_state.get_data_parallel_group()

    def dp_cp_group(self) -> dist.ProcessGroup:
        return data_parallel_group_with_context()

    def tp_group(self) -> dist.ProcessGroup:
        from megatron.core import parallel_state

        return parallel_state.get_tensor_model_parallel_group()

    def pp_group(self) -> dist.ProcessGroup:
        from megatron.core import parallel_state

        return parallel_state.get_pipeline_model_parallel_group()

    def model_parallel_group(self) -> dist.ProcessGroup:
        from megatron.core import parallel_state

        return parallel_state.get_model_parallel_group()


def initialize_parallel(cfg: ParallelConfig, seed: int) -> ParallelContext:
    """Join the process group from torchrun's environment and build megatron-core's groups.

    A single process without ``RANK``/``WORLD_SIZE`` in its environment runs as world size 1 on a
    free local port, so the same code path serves scripts, tests and torchrun.
    """
    device = activate_device(cfg.device)
    if "RANK" not in os.environ:
        os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(find_free_port()))
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if device == "cuda" else "gloo",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(minutes=cfg.distributed_timeout_minutes),
        )
    layout = ParallelLayout.from_config(cfg, world_size)

    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp,
        context_parallel_size=layout.cp,
        distributed_timeout_minutes=cfg.distributed_timeout_minutes,
    )
    model_parallel_cuda_manual_seed(seed)
    return ParallelContext(
        layout=layout,
        device=device,
        rank=rank,
        local_rank=local_rank,
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        dp_rank=parallel_state.get_data_parallel_rank(),
    )


def data_parallel_group_with_context() -> dist.ProcessGroup:
    """The group that averages the loss and the gradients: data x context parallel ranks."""
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_group(with_context_parallel=True)


def pipeline_stage_ends(vp_stage: int | None) -> tuple[bool, bool]:
    """Whether this rank's model chunk ``vp_stage`` (None without virtual pipelining) is the first
    and the last of the whole pipeline: it holds the embedding, and the output layer and loss."""
    from megatron.core import parallel_state

    return (
        parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
        parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
    )


def on_rank0(rank: int, fn: Callable[[], Any], error: type[Exception]) -> Any:
    """Run ``fn`` on rank 0 and hand its result to every rank (a world of one runs it alone).

    An exception on rank 0 reaches every rank as ``error``: its message as it is when it is an
    ``error`` already, else prefixed with its type. The other ranks wait for an answer, so one is
    always sent; none of them is left in the broadcast while rank 0 raises."""
    result, failure = None, None
    if rank == 0:
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001 - the other ranks wait: always answer
            failure = str(exc) if isinstance(exc, error) else f"{type(exc).__name__}: {exc}"
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [(result, failure)]
        dist.broadcast_object_list(box, src=0)
        result, failure = box[0]
    if failure is not None:
        raise error(failure)
    return result


def destroy_parallel() -> None:
    """Tear down megatron-core's groups and the default process group."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
