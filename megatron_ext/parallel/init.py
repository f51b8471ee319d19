"""Process-group and megatron-core parallel-state set-up and tear-down.

This is the one module that talks to ``megatron.core.parallel_state``: the rest of megatron_ext gets
what it needs (ranks, groups, the layout) from the ``ParallelContext`` returned here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from megatron_ext.parallel.config import ParallelConfig
from megatron_ext.parallel.cpu_compat import activate_device
from megatron_ext.parallel.layout import ParallelLayout


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


def destroy_parallel() -> None:
    """Tear down megatron-core's groups and the default process group."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


EPHEMERAL_RANGE_FILE = "/proc/sys/net/ipv4/ip_local_port_range"
LISTEN_PORTS_BELOW = 12000
"""How many ports under the ephemeral range ``find_free_port`` draws from."""


def find_free_port(ephemeral_range_file: str = EPHEMERAL_RANGE_FILE) -> int:
    """A free local TCP port for a rendezvous, outside the kernel's ephemeral port range.

    The port is free when chosen, not reserved: rank 0 listens on it only once the processes have
    started, or in a later phase minutes later. A port from the ephemeral range (what binding port
    0 gives) may by then have been taken by any outgoing connection on the machine, gloo's own
    among them; a port below that range is only ever taken by an explicit listen. So it is drawn
    at random from the ``LISTEN_PORTS_BELOW`` ports under the range (with a generator of its own,
    so that callers' seeds do not make processes draw alike) and checked free. Where the range
    is unknown or starts too low for that, the kernel picks.
    """
    import random
    import socket

    def free(port: int) -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                return False
            return True

    try:
        with open(ephemeral_range_file) as handle:
            low = int(handle.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 0
    if low - LISTEN_PORTS_BELOW >= 1024:
        draw = random.Random()  # seeded from the OS, whatever the caller seeded
        for _ in range(100):
            port = draw.randrange(low - LISTEN_PORTS_BELOW, low)
            if free(port):
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def find_free_ports(count: int) -> list[int]:
    """``count`` distinct ``find_free_port`` ports, for process groups formed one after another
    (a rank done with one phase may already be knocking on the next phase's port)."""
    ports: list[int] = []
    while len(ports) < count:
        port = find_free_port()
        if port not in ports:
            ports.append(port)
    return ports
