"""NCCL / PyTorch environment for one node, derived from its topology, each value with its reason.

Any variable already set in the caller's environment wins; it is reported as the user's choice next
to what would have been derived. Nothing here reads the machine: ``hardware.detect_node`` does that.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import socket
from collections.abc import Mapping

from megatron_ext.launch.hardware import IbPort, NetInterface, NodeTopology

# Interfaces that never carry traffic between nodes.
_VIRTUAL_PREFIXES = ("docker", "veth", "br-", "virbr", "cni", "flannel", "cali", "vxlan", "tun")
# Variables the launcher reports when the user set them, even if it derives nothing for them.
_REPORTED_PREFIXES = (
    "NCCL_",
    "TORCH_NCCL_",
    "GLOO_",
    "CUDA_DEVICE_MAX_CONNECTIONS",
    "OMP_NUM_THREADS",
    "CUDA_VISIBLE_DEVICES",
)

# Set by NVIDIA containers to describe the image, not to configure NCCL.
_NOT_SETTINGS = {"NCCL_VERSION"}

NCCL_IB_TIMEOUT = "22"
NCCL_IB_RETRY_CNT = "7"
ROCE_GID_INDEX_FALLBACK = 3


@dataclasses.dataclass
class EnvChoice:
    """One environment variable the launch sets (or keeps), and why."""

    name: str
    value: str
    reason: str
    source: str
    """``derived`` (from topology / layout) or ``user`` (already set in the environment)."""


@dataclasses.dataclass
class NodeEnvironment:
    """The environment chosen for one node plus the warnings found on the way."""

    choices: list[EnvChoice]
    warnings: list[str]

    def as_dict(self) -> dict[str, str]:
        return {c.name: c.value for c in self.choices}


def derive_environment(
    node: NodeTopology,
    *,
    nnodes: int,
    nproc_per_node: int,
    tensor_parallel: int,
    rdzv_host: str | None,
    environ: Mapping[str, str],
    num_cpus: int,
    route_source_ip: str | None = None,
    shutdown_timeout: int | None = None,
) -> NodeEnvironment:
    """Choose the NCCL / torch / OpenMP environment for one node of an ``nnodes`` job.

    ``route_source_ip`` is the local address the kernel would use to reach the rendezvous host
    (see ``source_ip_towards``); it picks the bootstrap interface when given.
    ``shutdown_timeout``: seconds torchrun lets ranks run after forwarding a signal.
    """
    derived: list[tuple[str, str, str]] = []
    warnings: list[str] = []
    _choose_ib(node.ib_ports, nnodes, derived, warnings)
    _choose_socket_interface(node.interfaces, rdzv_host, route_source_ip, nnodes, derived, warnings)
    if tensor_parallel > 1:
        derived.append(
            (
                "CUDA_DEVICE_MAX_CONNECTIONS",
                "1",
                f"TP={tensor_parallel}: megatron-core needs one CUDA work queue so that "
                "tensor-parallel communication is issued before the GEMM it overlaps "
                "with; it asserts this on Hopper",
            )
        )
    derived.append(
        (
            "TORCH_NCCL_ASYNC_ERROR_HANDLING",
            "3",
            "a failed or timed-out NCCL collective ends the process (without "
            "ncclCommAbort, which can hang on a broken fabric), so torchrun and SLURM "
            "see the failure instead of a job hanging until its time limit",
        )
    )
    threads = max(1, num_cpus // max(1, nproc_per_node))
    derived.append(
        (
            "OMP_NUM_THREADS",
            str(threads),
            f"{num_cpus} usable CPUs / {nproc_per_node} ranks on this node: "
            "ranks do not oversubscribe the cores",
        )
    )
    if shutdown_timeout is not None:
        # torchrun 2.13 reads this when --shutdown-timeout is not given; the flag itself is
        # not used because torchrun 2.11 rejects it.
        derived.append(
            (
                "TORCH_ELASTIC_SHUTDOWN_TIMEOUT",
                str(shutdown_timeout),
                "seconds torchrun gives ranks to save a checkpoint after forwarding SIGTERM / "
                "SIGUSR1, before SIGKILL (its default, 30 s, is short for a large checkpoint)",
            )
        )
    derived.append(("PYTHONUNBUFFERED", "1", "log lines of all ranks reach the log as written"))
    return NodeEnvironment(_apply_user_environment(derived, environ), warnings)


def source_ip_towards(host: str) -> str | None:
    """The local IPv4 address the routing table picks to reach ``host`` (no packet is sent)."""
    try:
        address = socket.gethostbyname(host)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((address, 9))
            return probe.getsockname()[0]
    except OSError:
        return None


def usable_cpus() -> int:
    """CPUs this process may run on (the SLURM allocation inside a job step)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _choose_ib(ports: list[IbPort], nnodes: int, derived: list, warnings: list[str]) -> None:
    for port in ports:
        if not port.is_active:
            warnings.append(
                f"{port.name} ({port.link_layer}) is {port.state or 'unknown'} "
                f"(phys_state {port.phys_state or 'unknown'}): left out of "
                "NCCL_IB_HCA"
            )
    active_ib = [p for p in ports if p.is_active and not p.is_roce]
    active_roce = [p for p in ports if p.is_active and p.is_roce]
    if active_ib:
        chosen = active_ib
        reason = f"{len(active_ib)} active InfiniBand port(s)"
        if active_roce:
            reason += (
                f"; Ethernet-link ports {', '.join(p.name for p in active_roce)} left out "
                "(on InfiniBand clusters those serve storage / front-end traffic)"
            )
    elif active_roce:
        chosen = active_roce
        reason = f"{len(active_roce)} active RoCE port(s) (link layer Ethernet), no InfiniBand"
    else:
        if ports or nnodes > 1:
            warnings.append(
                "no active InfiniBand / RoCE port: NCCL falls back to TCP sockets "
                "between nodes"
                + (", far slower than the fabric" if nnodes > 1 else " (fine for one node)")
            )
        return
    # "=" makes NCCL match names exactly: plain "mlx5_1" would also select mlx5_10, mlx5_11...
    derived.append(
        (
            "NCCL_IB_HCA",
            "=" + ",".join(p.name for p in chosen),
            reason + "; '=' asks NCCL for exact names, not prefixes",
        )
    )
    derived.append(
        (
            "NCCL_IB_TIMEOUT",
            NCCL_IB_TIMEOUT,
            "4.096 us x 2^22 = 17 s per RDMA retry: rides out transient fabric "
            "congestion on large jobs (NCCL's default 20 is ~4 s)",
        )
    )
    derived.append(
        (
            "NCCL_IB_RETRY_CNT",
            NCCL_IB_RETRY_CNT,
            "the InfiniBand maximum; pinned so an inherited lower value cannot apply",
        )
    )
    if chosen is active_roce:
        indices = {p.roce_v2_ipv4_gid_index for p in chosen}
        if len(indices) == 1 and None not in indices:
            index = indices.pop()
            derived.append(
                (
                    "NCCL_IB_GID_INDEX",
                    str(index),
                    f"GID {index} is the RoCE v2 entry with an IPv4 address on every "
                    "chosen port (routable across subnets)",
                )
            )
        else:
            derived.append(
                (
                    "NCCL_IB_GID_INDEX",
                    str(ROCE_GID_INDEX_FALLBACK),
                    "no single RoCE v2 IPv4 GID index common to all ports in sysfs; "
                    f"{ROCE_GID_INDEX_FALLBACK} is the usual one on Mellanox/NVIDIA NICs",
                )
            )
            warnings.append(
                "RoCE GID index not found in sysfs for every port: "
                f"NCCL_IB_GID_INDEX={ROCE_GID_INDEX_FALLBACK} is a guess; check "
                "`show_gids` and set it yourself"
            )


def _choose_socket_interface(
    interfaces: list[NetInterface],
    rdzv_host: str | None,
    route_source_ip: str | None,
    nnodes: int,
    derived: list,
    warnings: list[str],
) -> None:
    loopback = next((i for i in interfaces if i.link_type == "loopback"), None)
    if rdzv_host and _is_loopback_host(rdzv_host) and loopback:
        chosen, reason = loopback, f"rendezvous host {rdzv_host} is this machine's loopback"
    else:
        eligible = [i for i in interfaces if _bootstrap_candidate(i)]
        routed = [i for i in eligible if route_source_ip and route_source_ip in i.ipv4]
        if routed:
            chosen = routed[0]
            reason = f"carries the route to the rendezvous host {rdzv_host} ({route_source_ip})"
        elif eligible:
            chosen = eligible[0]
            reason = (
                "first interface that is up with an IPv4 address and is not loopback, "
                "a container bridge or IPoIB"
            )
        else:
            if nnodes > 1:
                warnings.append(
                    "no interface for NCCL / gloo bootstrap (up, IPv4, not "
                    "loopback / docker / IPoIB): set NCCL_SOCKET_IFNAME yourself"
                )
            return
    derived.append(
        (
            "NCCL_SOCKET_IFNAME",
            "=" + chosen.name,
            f"bootstrap and socket fallback on {chosen.name}: {reason}",
        )
    )
    derived.append(
        (
            "GLOO_SOCKET_IFNAME",
            chosen.name,
            f"gloo (CPU groups) on the same interface as NCCL's bootstrap: {reason}",
        )
    )


def _bootstrap_candidate(interface: NetInterface) -> bool:
    return (
        interface.is_up
        and bool(interface.ipv4)
        and interface.link_type not in ("loopback", "infiniband")
        and not interface.name.startswith(_VIRTUAL_PREFIXES)
    )


def _is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _apply_user_environment(
    derived: list[tuple[str, str, str]], environ: Mapping[str, str]
) -> list[EnvChoice]:
    choices = []
    for name, value, reason in derived:
        if name in environ:
            choices.append(
                EnvChoice(
                    name,
                    environ[name],
                    f"set in your environment (derived {value!r}: {reason})",
                    "user",
                )
            )
        else:
            choices.append(EnvChoice(name, value, reason, "derived"))
    names = {c.name for c in choices} | _NOT_SETTINGS
    for name in sorted(environ):
        if name not in names and name.startswith(_REPORTED_PREFIXES):
            choices.append(EnvChoice(name, environ[name], "set in your environment", "user"))
    return choices
