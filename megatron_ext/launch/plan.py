"""Build, print and start the torchrun command of each node (what launch/*.sh call).

One node by hand (or the first of several, started on each node with its own ``--node-rank``):

    python -m megatron_ext.launch.plan --dry-run -- --config examples/configs/tiny_cpu.yaml

Inside a SLURM job step (one task per node; ranks, hosts and rendezvous come from SLURM_*):

    python -m megatron_ext.launch.plan --slurm -- --config recipe.yaml

Without SLURM, ``--slurm --dry-run`` with ``SLURM_JOB_NODELIST=gpu[01-04] SLURM_JOB_ID=7`` set
prints every node's command. ``DRY_RUN=1`` in the environment equals ``--dry-run``. Everything
after ``--`` goes to the training program (``-m megatron_ext.train`` unless ``--entry`` says
otherwise). Environment choices come from this node's topology (``--nvidia-smi-topo``,
``--sysfs-root``, ``--ip-addr`` replay recorded outputs instead).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from megatron_ext.launch.environment import (
    NodeEnvironment,
    derive_environment,
    source_ip_towards,
    usable_cpus,
)
from megatron_ext.launch.hardware import NodeTopology, detect_node
from megatron_ext.launch.hostlist import expand_hostlist
from megatron_ext.launch.layout import (
    ParallelLayout,
    advise_layout,
    config_path_from_args,
    read_parallel_layout,
)
from megatron_ext.parallel.ports import find_free_port

# torchrun handles SIGTERM,SIGINT,SIGHUP,SIGQUIT by default; anything else (SLURM's usual
# preemption warning, SIGUSR1) kills torchrun outright and orphans its workers, which run in their
# own session and never see the signal. Listed here, torchrun forwards it to every worker.
SIGNALS_TO_HANDLE = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
DEFAULT_PORT = 29500


@dataclasses.dataclass
class LaunchSpec:
    """One multi-node job: the same for every node but its node rank."""

    nnodes: int
    nproc_per_node: int
    rdzv_host: str
    rdzv_port: int
    rdzv_id: str
    train_args: list[str]
    entry: str = "megatron_ext.train"
    """A module (``-m``) or, when it ends in ``.py``, a script."""
    hosts: list[str] | None = None
    """Host of each node rank (SLURM); None when nodes are started by hand."""
    shutdown_timeout: int = 240
    """Seconds torchrun waits for ranks to save and exit after forwarding a signal."""
    max_restarts: int = 0
    reasons: dict[str, str] = dataclasses.field(default_factory=dict)
    """Why nproc_per_node / rendezvous / port have their values."""

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node


@dataclasses.dataclass
class NodeLaunch:
    """What one node runs."""

    node_rank: int
    host: str | None
    global_ranks: range
    argv: list[str]


def torchrun_prefix() -> list[str]:
    """The torchrun of this Python environment (or ``python -m torch.distributed.run``)."""
    beside = Path(sys.executable).with_name("torchrun")
    return [str(beside)] if beside.exists() else [sys.executable, "-m", "torch.distributed.run"]


def build_torchrun_argv(spec: LaunchSpec, node_rank: int, prefix: Sequence[str]) -> list[str]:
    """The exact torchrun command line for ``node_rank``."""
    if not 0 <= node_rank < spec.nnodes:
        raise ValueError(f"node rank {node_rank} is outside 0..{spec.nnodes - 1}")
    argv = [
        *prefix,
        f"--nnodes={spec.nnodes}",
        f"--nproc-per-node={spec.nproc_per_node}",
        f"--node-rank={node_rank}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={spec.rdzv_host}:{spec.rdzv_port}",
        f"--rdzv-id={spec.rdzv_id}",
        # Node 0 hosts the rendezvous store: no guessing from host names, which fails when the
        # first node's name resolves to an address of another interface.
        f"--rdzv-conf=is_host={1 if node_rank == 0 else 0}",
        f"--max-restarts={spec.max_restarts}",
        f"--signals-to-handle={SIGNALS_TO_HANDLE}",
    ]
    if spec.entry.endswith(".py"):
        argv.append(spec.entry)
    else:
        argv += ["-m", spec.entry]
    return argv + list(spec.train_args)


def global_rank_ranges(spec: LaunchSpec) -> list[range]:
    """Global ranks each node rank will hold.

    The c10d rendezvous ignores ``--node-rank``: it numbers nodes in the sorted order of their
    host names. With ``hosts`` known that order is computed; without, host names are assumed to
    sort like node ranks.
    """
    order = list(range(spec.nnodes))
    if spec.hosts:
        order = sorted(order, key=lambda r: (spec.hosts[r], r))
    position = {node_rank: i for i, node_rank in enumerate(order)}
    g = spec.nproc_per_node
    return [range(position[r] * g, position[r] * g + g) for r in range(spec.nnodes)]


def plan_nodes(spec: LaunchSpec, prefix: Sequence[str]) -> list[NodeLaunch]:
    """Every node's launch, node rank 0 first."""
    ranges = global_rank_ranges(spec)
    return [
        NodeLaunch(
            r,
            spec.hosts[r] if spec.hosts else None,
            ranges[r],
            build_torchrun_argv(spec, r, prefix),
        )
        for r in range(spec.nnodes)
    ]


def spec_from_slurm(
    environ: Mapping[str, str],
    train_args: list[str],
    nproc_per_node: int,
    nproc_reason: str,
    port: int | None = None,
    entry: str = "megatron_ext.train",
) -> LaunchSpec:
    """The job as SLURM describes it: hosts, node count, job id (rendezvous id and port)."""
    nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
    job_id = environ.get("SLURM_JOB_ID") or environ.get("SLURM_JOBID")
    if not nodelist or not job_id:
        raise ValueError(
            "--slurm needs SLURM_JOB_NODELIST and SLURM_JOB_ID (set by SLURM; set "
            "them yourself for a dry run, e.g. SLURM_JOB_NODELIST='gpu[01-04]')"
        )
    hosts = expand_hostlist(nodelist)
    nnodes_text = environ.get("SLURM_JOB_NUM_NODES") or environ.get("SLURM_NNODES")
    if nnodes_text and int(nnodes_text) != len(hosts):
        raise ValueError(
            f"SLURM_JOB_NUM_NODES={nnodes_text} but {nodelist!r} names {len(hosts)} hosts"
        )
    reasons = {
        "nproc_per_node": nproc_reason,
        "rendezvous": f"first host of SLURM_JOB_NODELIST={nodelist}, id = SLURM_JOB_ID",
    }
    if port is None:
        # Derived from the job id so that two jobs sharing a first node do not collide.
        port = DEFAULT_PORT + int(job_id) % 1000 if job_id.isdigit() else DEFAULT_PORT
        reasons["port"] = f"{DEFAULT_PORT} + SLURM_JOB_ID mod 1000 (no MASTER_PORT set)"
    else:
        reasons["port"] = "given (--rdzv-port or MASTER_PORT)"
    return LaunchSpec(
        nnodes=len(hosts),
        nproc_per_node=nproc_per_node,
        rdzv_host=hosts[0],
        rdzv_port=port,
        rdzv_id=job_id,
        train_args=train_args,
        entry=entry,
        hosts=hosts,
        reasons=reasons,
    )


def resolve_nproc_per_node(
    given: str | None, node: NodeTopology, environ: Mapping[str, str]
) -> tuple[int, str]:
    """Ranks per node and why: given > SLURM's GPU count > GPUs found > 1 (CPU, gloo)."""
    if given and given != "auto":
        return int(given), "given"
    for name in ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE"):
        value = environ.get(name, "").rsplit(":", 1)[-1]
        if value.isdigit() and int(value) > 0:
            return int(value), f"{name}={environ[name]}"
    if node.num_gpus:
        return node.num_gpus, f"{node.num_gpus} GPUs in {node.sources.get('gpus')}"
    return 1, "no GPU found: one CPU rank per node (gloo backend)"


def assess_node(
    node: NodeTopology,
    spec: LaunchSpec,
    layout: ParallelLayout,
    environ: Mapping[str, str],
    *,
    live_routing: bool,
) -> tuple[NodeEnvironment, list[str]]:
    """Environment for this node plus layout notes; layout warnings join the env warnings."""
    env = derive_environment(
        node,
        nnodes=spec.nnodes,
        nproc_per_node=spec.nproc_per_node,
        tensor_parallel=layout.tensor_model_parallel_size,
        rdzv_host=spec.rdzv_host,
        environ=environ,
        num_cpus=usable_cpus(),
        shutdown_timeout=spec.shutdown_timeout,
        route_source_ip=source_ip_towards(spec.rdzv_host) if live_routing else None,
    )
    domains = node.gpus.nvlink_domains() if node.gpus else None
    notes, warnings = advise_layout(
        layout,
        nnodes=spec.nnodes,
        gpus_per_node=spec.nproc_per_node,
        nvlink_domain_size=min(len(d) for d in domains) if domains else None,
    )
    env.warnings.extend(warnings)
    return env, notes


def format_node(
    launch: NodeLaunch, spec: LaunchSpec, env: NodeEnvironment, notes: list[str]
) -> str:
    """Human-readable and shell-pasteable: ``export`` lines with reasons, then the command."""
    ranks = launch.global_ranks
    host = f" ({launch.host})" if launch.host else ""
    lines = [
        f"# node {launch.node_rank} of {spec.nnodes}{host}: global ranks "
        f"{ranks.start}-{ranks.stop - 1} of world size {spec.world_size}"
    ]
    lines += [f"#   {key}: {why}" for key, why in spec.reasons.items()]
    lines += [f"# note: {n}" for n in notes]
    lines += [f"# WARNING: {w}" for w in env.warnings]
    for choice in env.choices:
        lines.append(
            f"export {choice.name}={shlex.quote(choice.value)}  # [{choice.source}] {choice.reason}"
        )
    lines.append(shlex.join(launch.argv))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args, train_args = _parse(argv)
    environ = dict(os.environ)
    dry_run = args.dry_run or environ.get("DRY_RUN", "0").lower() not in ("", "0", "false", "no")
    try:
        node = detect_node(args.nvidia_smi_topo, args.sysfs_root, args.ip_addr)
        nproc, nproc_reason = resolve_nproc_per_node(args.nproc_per_node, node, environ)
        port = args.rdzv_port or (int(environ["MASTER_PORT"]) if "MASTER_PORT" in environ else None)
        if args.slurm:
            spec = spec_from_slurm(environ, train_args, nproc, nproc_reason, port, args.entry)
        else:
            host, _, endpoint_port = (args.rdzv_endpoint or "127.0.0.1").partition(":")
            rendezvous = (
                "given"
                if args.rdzv_endpoint
                else "this machine, "
                + ("the given port" if port else "a free port")
                + " (one node, no --rdzv-endpoint)"
            )
            if not (endpoint_port or port):
                # One node of its own: a free port, so that two jobs on one machine (two 4-GPU
                # jobs on an 8-GPU node) do not both take 29500.
                port = DEFAULT_PORT if args.rdzv_endpoint else find_free_port()
            spec = LaunchSpec(
                nnodes=args.nnodes,
                nproc_per_node=nproc,
                rdzv_host=host,
                rdzv_port=int(endpoint_port or port),
                rdzv_id=args.rdzv_id or environ.get("SLURM_JOB_ID", "megatron_ext"),
                train_args=train_args,
                entry=args.entry,
                reasons={"nproc_per_node": nproc_reason, "rendezvous": rendezvous},
            )
        spec.shutdown_timeout = args.shutdown_timeout
        spec.max_restarts = args.max_restarts
        layout = read_parallel_layout(config_path_from_args(train_args), train_args)
        node_rank = None if dry_run else _this_node_rank(args, environ, spec.nnodes)
    except (OSError, ValueError) as exc:
        print(f"launch: {exc}", file=sys.stderr)
        return 2
    spec.reasons["layout"] = layout.source
    env, notes = assess_node(
        node, spec, layout, environ, live_routing=not (dry_run or args.ip_addr)
    )
    nodes = plan_nodes(spec, torchrun_prefix())
    if dry_run:
        print(f"# DRY RUN: nothing is started. Topology: {node.sources}")
        if spec.nnodes > 1:
            print(
                "# each node derives its environment from its own topology at run time; "
                "shown here: this machine's (or the recorded one given)"
            )
        for launch in nodes:
            print(format_node(launch, spec, env, notes) + "\n")
        return 0
    assert node_rank is not None
    print(format_node(nodes[node_rank], spec, env, notes), flush=True)
    os.execvpe(nodes[node_rank].argv[0], nodes[node_rank].argv, {**environ, **env.as_dict()})
    return 0  # not reached: exec replaced this process


def _this_node_rank(args: argparse.Namespace, environ: Mapping[str, str], nnodes: int) -> int:
    if args.node_rank is not None:
        rank, source = args.node_rank, "--node-rank"
    elif args.slurm:
        if "SLURM_NODEID" not in environ:
            raise ValueError(
                "--slurm without --dry-run runs inside `srun`, which sets "
                "SLURM_NODEID; it is not set"
            )
        rank, source = environ["SLURM_NODEID"], "SLURM_NODEID"
    else:
        rank, source = environ.get("NODE_RANK", "0"), "NODE_RANK"
    if not str(rank).isdigit() or not 0 <= int(rank) < nnodes:
        raise ValueError(f"{source}={rank} is not a node rank in 0..{nnodes - 1}")
    return int(rank)


def _parse(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    train_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, train_args = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(
        prog="python -m megatron_ext.launch.plan",
        description="Print or start this node's torchrun command with a topology-derived "
        "environment. Training arguments go after `--`.",
    )
    parser.add_argument("--dry-run", action="store_true", help="print, start nothing (DRY_RUN=1)")
    parser.add_argument("--slurm", action="store_true", help="take nodes / ids from SLURM_*")
    parser.add_argument("--nnodes", type=int, default=1)
    parser.add_argument(
        "--node-rank",
        type=int,
        default=None,
        help="this node (default: SLURM_NODEID with --slurm, else NODE_RANK or 0)",
    )
    parser.add_argument(
        "--nproc-per-node",
        default=os.environ.get("NPROC_PER_NODE"),
        help="ranks per node (default: GPUs found, 1 without GPUs)",
    )
    parser.add_argument("--rdzv-endpoint", default=None, help="HOST:PORT of node 0")
    parser.add_argument("--rdzv-port", type=int, default=None)
    parser.add_argument("--rdzv-id", default=None, help="same on all nodes of one job")
    parser.add_argument(
        "--entry",
        default="megatron_ext.train",
        help="training module, or a script path ending in .py",
    )
    parser.add_argument(
        "--shutdown-timeout",
        type=int,
        default=240,
        help="seconds ranks get to save a checkpoint after a signal",
    )
    parser.add_argument("--max-restarts", type=int, default=0)
    parser.add_argument(
        "--nvidia-smi-topo",
        default=os.environ.get("LAUNCH_NVIDIA_SMI_TOPO"),
        help="recorded `nvidia-smi topo -m` output instead of running it",
    )
    parser.add_argument(
        "--sysfs-root",
        default=os.environ.get("LAUNCH_SYSFS_ROOT"),
        help="directory holding class/infiniband instead of /sys",
    )
    parser.add_argument(
        "--ip-addr",
        default=os.environ.get("LAUNCH_IP_ADDR"),
        help="recorded `ip addr show` output instead of running it",
    )
    args = parser.parse_args(argv)
    if args.nnodes < 1:
        parser.error("--nnodes must be at least 1")
    if args.nnodes > 1 and not args.slurm and not args.rdzv_endpoint:
        parser.error("--nnodes > 1 needs --rdzv-endpoint HOST:PORT of node 0")
    return args, train_args


if __name__ == "__main__":
    sys.exit(main())
