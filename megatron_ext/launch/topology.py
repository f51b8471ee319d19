"""Report a node's GPU, NVLink, InfiniBand and network topology and the launch environment.

On the machine itself (CPU example; no GPU and no RDMA device found is a valid answer):

    python -m megatron_ext.launch.topology --config examples/configs/tiny_cpu.yaml

Replaying recorded outputs of another node, for a 4-node job:

    python -m megatron_ext.launch.topology --nnodes 4 \\
        --nvidia-smi-topo tests/fixtures/topology/nvidia_smi_topo_h100_sxm.txt \\
        --sysfs-root tests/fixtures/topology/sysfs_h100_ib \\
        --ip-addr tests/fixtures/topology/ip_addr_h100.txt --tp 8 --pp 2

``--format env`` prints only ``export`` lines (``eval "$(python -m ... --format env)"``), ``json``
prints everything as one object. Exit status 0; 1 when ``--strict`` and there are warnings.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys

from megatron_ext.launch.environment import derive_environment, usable_cpus
from megatron_ext.launch.hardware import NodeTopology, detect_node
from megatron_ext.launch.layout import ParallelLayout, advise_layout, read_parallel_layout


def describe_node(node: NodeTopology) -> list[str]:
    """Plain-language lines about GPUs, NVLink domains, affinity and RDMA ports."""
    lines = [f"sources: {node.sources}"]
    if node.gpus:
        gpus = node.gpus
        domains = gpus.nvlink_domains()
        lines.append(f"GPUs: {gpus.num_gpus}")
        if all(len(d) == 1 for d in domains):
            lines.append("NVLink: none between GPUs (PCIe / SMP interconnect only)")
        else:
            for domain in domains:
                links = sorted({gpus.nvlink_count(a, b) for a in domain for b in domain if a != b})
                lines.append(f"NVLink domain: GPUs {domain} (NV{'/NV'.join(map(str, links))})")
        for i in range(gpus.num_gpus):
            lines.append(
                f"GPU{i}: CPUs {gpus.cpu_affinity[i] or '?'}, NUMA {gpus.numa_affinity[i] or '?'}"
            )
        if gpus.nic_names:
            lines.append(f"NICs in nvidia-smi legend: {', '.join(gpus.nic_names)}")
    else:
        lines.append("GPUs: none")
    for port in node.ib_ports:
        extra = (
            f", RoCE v2 IPv4 GID {port.roce_v2_ipv4_gid_index}"
            if port.is_roce and port.roce_v2_ipv4_gid_index is not None
            else ""
        )
        lines.append(
            f"RDMA {port.name}: {port.state} / {port.phys_state}, "
            f"{port.link_layer}, {port.rate}{extra}"
        )
    for iface in node.interfaces:
        lines.append(
            f"interface {iface.name}: {'up' if iface.is_up else 'down'}, "
            f"{iface.link_type or '?'}, IPv4 {', '.join(iface.ipv4) or 'none'}"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_ext.launch.topology", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--nvidia-smi-topo", help="recorded `nvidia-smi topo -m` output")
    parser.add_argument("--sysfs-root", help="directory holding class/infiniband (default /sys)")
    parser.add_argument("--ip-addr", help="recorded `ip addr show` output")
    parser.add_argument("--config", help="experiment YAML: TP / PP from its `parallel:` section")
    parser.add_argument("--tp", type=int, help="tensor parallel size (overrides --config)")
    parser.add_argument("--pp", type=int, help="pipeline parallel size (overrides --config)")
    parser.add_argument("--nnodes", type=int, default=1)
    parser.add_argument("--nproc-per-node", type=int, help="default: GPUs found, else 1")
    parser.add_argument("--rdzv-host", help="rendezvous host (picks the bootstrap interface)")
    parser.add_argument("--format", choices=("text", "env", "json"), default="text")
    parser.add_argument("--strict", action="store_true", help="exit 1 when there are warnings")
    args = parser.parse_args(argv)
    try:
        node = detect_node(args.nvidia_smi_topo, args.sysfs_root, args.ip_addr)
        layout = read_parallel_layout(args.config)
    except (OSError, ValueError) as exc:
        print(f"topology: {exc}", file=sys.stderr)
        return 2
    if args.tp or args.pp:
        layout = ParallelLayout(
            args.tp or layout.tensor_model_parallel_size,
            args.pp or layout.pipeline_model_parallel_size,
            "command line",
        )
    nproc = args.nproc_per_node or node.num_gpus or 1
    env = derive_environment(
        node,
        nnodes=args.nnodes,
        nproc_per_node=nproc,
        tensor_parallel=layout.tensor_model_parallel_size,
        rdzv_host=args.rdzv_host,
        environ=dict(os.environ),
        num_cpus=usable_cpus(),
    )
    domains = node.gpus.nvlink_domains() if node.gpus else None
    notes, layout_warnings = advise_layout(
        layout,
        nnodes=args.nnodes,
        gpus_per_node=nproc,
        nvlink_domain_size=min(len(d) for d in domains) if domains else None,
    )
    warnings = env.warnings + layout_warnings
    if args.format == "json":
        print(
            json.dumps(
                {
                    "node": dataclasses.asdict(node),
                    "environment": [dataclasses.asdict(c) for c in env.choices],
                    "layout": dataclasses.asdict(layout),
                    "notes": notes,
                    "warnings": warnings,
                },
                indent=2,
            )
        )
    elif args.format == "env":
        for choice in env.choices:
            print(f"export {choice.name}={shlex.quote(choice.value)}")
        for warning in warnings:
            print(f"WARNING: {warning}", file=sys.stderr)
    else:
        print("\n".join(describe_node(node)))
        print(
            f"layout: TP={layout.tensor_model_parallel_size} "
            f"PP={layout.pipeline_model_parallel_size} from {layout.source}; "
            f"{args.nnodes} node(s) x {nproc} rank(s)"
        )
        for choice in env.choices:
            print(f"{choice.name}={choice.value}  [{choice.source}] {choice.reason}")
        for note in notes:
            print(f"note: {note}")
        for warning in warnings:
            print(f"WARNING: {warning}")
    return 1 if args.strict and warnings else 0


if __name__ == "__main__":
    sys.exit(main())
