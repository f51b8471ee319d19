"""What one node has: GPUs and their links, InfiniBand / RoCE ports, network interfaces.

Three sources, each parsed from text or a directory so that recorded outputs of real nodes can be
replayed in tests:

- ``nvidia-smi topo -m``: the GPU x GPU link matrix (``NV18`` = 18 bonded NVLinks, ``PIX`` /
  ``PXB`` / ``PHB`` / ``NODE`` / ``SYS`` = PCIe paths), CPU / NUMA affinity per GPU, the NIC legend.
- ``/sys/class/infiniband/<hca>/ports/<n>/``: port state, link layer (``InfiniBand`` or
  ``Ethernet`` = RoCE) and, for RoCE, the GID table (``gids/<i>`` + ``gid_attrs/types/<i>``).
- ``ip addr show``: interfaces, their state, link type and IPv4 addresses.

``detect_node`` reads the live machine; every field it fills can also come from a file.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
from pathlib import Path

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_NVLINK = re.compile(r"^NV(\d+)$")


@dataclasses.dataclass
class GpuTopology:
    """GPUs of one node as ``nvidia-smi topo -m`` reports them."""

    links: list[list[str]]
    """``links[i][j]``: the connection between GPU i and GPU j (``X`` on the diagonal)."""
    cpu_affinity: list[str]
    """CPU list per GPU (``0-63,128-191``), empty when not reported."""
    numa_affinity: list[str]
    """NUMA node per GPU, empty when not reported."""
    nic_names: list[str]
    """HCA names from the NIC legend (``mlx5_0``...), in NIC0, NIC1... order."""

    @property
    def num_gpus(self) -> int:
        return len(self.links)

    def nvlink_count(self, i: int, j: int) -> int:
        """Bonded NVLinks between GPU i and j (0 when they talk over PCIe)."""
        match = _NVLINK.match(self.links[i][j])
        return int(match.group(1)) if match else 0

    def nvlink_domains(self) -> list[list[int]]:
        """Groups of GPUs in which every pair is directly NVLink-connected (cliques, in order)."""
        domains: list[list[int]] = []
        for gpu in range(self.num_gpus):
            for domain in domains:
                if all(self.nvlink_count(gpu, other) > 0 for other in domain):
                    domain.append(gpu)
                    break
            else:
                domains.append([gpu])
        return domains


@dataclasses.dataclass
class IbPort:
    """One port of an RDMA device under ``/sys/class/infiniband``."""

    hca: str
    port: int
    state: str
    """``ACTIVE``, ``DOWN``, ``INIT``, ``ARMED`` (the word after ``4: `` in sysfs)."""
    phys_state: str
    """``LinkUp``, ``Disabled``, ``Polling``..."""
    link_layer: str
    """``InfiniBand`` or ``Ethernet`` (RoCE)."""
    rate: str
    roce_v2_ipv4_gid_index: int | None = None
    """Lowest GID index of type ``RoCE v2`` holding an IPv4-mapped address (RoCE only)."""

    @property
    def is_active(self) -> bool:
        return self.state == "ACTIVE"

    @property
    def is_roce(self) -> bool:
        return self.link_layer == "Ethernet"

    @property
    def name(self) -> str:
        """``mlx5_0:1``: the spelling NCCL_IB_HCA uses."""
        return f"{self.hca}:{self.port}"


@dataclasses.dataclass
class NetInterface:
    """One interface from ``ip addr show``."""

    name: str
    is_up: bool
    link_type: str
    """``ether``, ``loopback``, ``infiniband`` (IPoIB)..."""
    ipv4: list[str]
    """Addresses without prefix length."""


@dataclasses.dataclass
class NodeTopology:
    """Everything the launcher knows about one node, with where each part came from."""

    gpus: GpuTopology | None
    ib_ports: list[IbPort]
    interfaces: list[NetInterface]
    sources: dict[str, str]
    """Where each part came from (``gpus`` / ``ib`` / ``net`` -> command, path or "not found")."""

    @property
    def num_gpus(self) -> int:
        return self.gpus.num_gpus if self.gpus else 0


def parse_nvidia_smi_topo(text: str) -> GpuTopology:
    """Parse ``nvidia-smi topo -m`` output (with or without the terminal underline codes)."""
    lines = [_ANSI.sub("", line.rstrip("\n")) for line in text.splitlines()]
    header_at = next((i for i, line in enumerate(lines) if line.strip().startswith("GPU0")), None)
    if header_at is None:
        raise ValueError("nvidia-smi topo output has no header line starting with GPU0")
    header = [cell.strip() for cell in lines[header_at].split("\t") if cell.strip()]
    gpu_cols = [c for c in header if re.fullmatch(r"GPU\d+", c)]
    nic_cols = [c for c in header if re.fullmatch(r"NIC\d+", c)]
    extra_cols = header[len(gpu_cols) + len(nic_cols) :]
    links, cpu_aff, numa_aff = [], [], []
    for line in lines[header_at + 1 :]:
        cells = [cell.strip() for cell in line.split("\t")]
        if not re.fullmatch(r"GPU\d+", cells[0]):
            continue
        matrix = cells[1 : 1 + len(gpu_cols) + len(nic_cols)]
        if len(matrix) < len(gpu_cols):
            raise ValueError(
                f"nvidia-smi topo row {cells[0]!r} has {len(matrix)} link cells, "
                f"the header names {len(gpu_cols)} GPUs"
            )
        rest = dict(zip(extra_cols, [c for c in cells[1 + len(matrix) :] if c]))
        links.append(matrix[: len(gpu_cols)])
        cpu_aff.append(rest.get("CPU Affinity", ""))
        numa_aff.append(rest.get("NUMA Affinity", ""))
    if len(links) != len(gpu_cols):
        raise ValueError(f"nvidia-smi topo names {len(gpu_cols)} GPUs but has {len(links)} rows")
    nic_names = []
    for line in lines:
        match = re.match(r"^\s*NIC(\d+):\s*(\S+)\s*$", line)
        if match:
            nic_names.append(match.group(2))
    return GpuTopology(links, cpu_aff, numa_aff, nic_names)


def read_ib_ports(sysfs_root: str | Path = "/sys") -> list[IbPort]:
    """All ports of all RDMA devices under ``<sysfs_root>/class/infiniband`` (none if absent)."""
    base = Path(sysfs_root) / "class" / "infiniband"
    if not base.is_dir():
        return []
    ports = []
    for hca_dir in sorted(base.iterdir(), key=lambda p: _natural_key(p.name)):
        ports_dir = hca_dir / "ports"
        if not ports_dir.is_dir():
            continue
        for port_dir in sorted(ports_dir.iterdir(), key=lambda p: _natural_key(p.name)):
            link_layer = _read_word(port_dir / "link_layer", last=True)
            ports.append(
                IbPort(
                    hca=hca_dir.name,
                    port=int(port_dir.name),
                    state=_read_word(port_dir / "state", last=True),
                    phys_state=_read_word(port_dir / "phys_state", last=True),
                    link_layer=link_layer,
                    rate=_read_text(port_dir / "rate"),
                    roce_v2_ipv4_gid_index=_roce_v2_ipv4_gid(port_dir)
                    if link_layer == "Ethernet"
                    else None,
                )
            )
    return ports


def parse_ip_addr(text: str) -> list[NetInterface]:
    """Parse ``ip addr show`` output into interfaces (state, link type, IPv4 addresses)."""
    interfaces: list[NetInterface] = []
    for line in text.splitlines():
        head = re.match(r"^\d+:\s+([^:@\s]+)(?:@\S+)?:\s+<([^>]*)>(.*)$", line)
        if head:
            flags = head.group(2).split(",")
            state = re.search(r"\bstate (\S+)", head.group(3))
            # "state UNKNOWN" is normal for loopback and some virtual links: trust LOWER_UP then.
            is_up = (
                "UP" in flags
                and "LOWER_UP" in flags
                and (state is None or state.group(1) in ("UP", "UNKNOWN"))
            )
            interfaces.append(NetInterface(head.group(1), is_up, "", []))
            continue
        if not interfaces:
            continue
        link = re.match(r"^\s+link/(\S+)", line)
        if link:
            interfaces[-1].link_type = link.group(1)
        inet = re.match(r"^\s+inet (\d+\.\d+\.\d+\.\d+)", line)
        if inet:
            interfaces[-1].ipv4.append(inet.group(1))
    return interfaces


def detect_node(
    topo_file: str | None = None, sysfs_root: str | None = None, ip_file: str | None = None
) -> NodeTopology:
    """Read this node's topology; each ``*_file`` / root replaces the live source when given."""
    sources: dict[str, str] = {}
    gpus = None
    if topo_file:
        gpus = parse_nvidia_smi_topo(Path(topo_file).read_text(encoding="utf-8"))
        sources["gpus"] = topo_file
    elif shutil.which("nvidia-smi"):
        text = _run(["nvidia-smi", "topo", "-m"])
        gpus = parse_nvidia_smi_topo(text) if text and "GPU0" in text else None
        sources["gpus"] = "nvidia-smi topo -m" if gpus else "nvidia-smi topo -m failed: no GPUs"
    else:
        sources["gpus"] = "nvidia-smi not found: no GPUs"
    root = sysfs_root or "/sys"
    ib_ports = read_ib_ports(root)
    sources["ib"] = f"{root}/class/infiniband" + ("" if ib_ports else " (no RDMA devices)")
    if ip_file:
        interfaces = parse_ip_addr(Path(ip_file).read_text(encoding="utf-8"))
        sources["net"] = ip_file
    else:
        interfaces, sources["net"] = _live_interfaces()
    return NodeTopology(gpus, ib_ports, interfaces, sources)


def _live_interfaces() -> tuple[list[NetInterface], str]:
    if shutil.which("ip"):
        text = _run(["ip", "addr", "show"])
        if text:
            return parse_ip_addr(text), "ip addr show"
    import socket

    import psutil

    stats = psutil.net_if_stats()
    interfaces = []
    for name, addrs in psutil.net_if_addrs().items():
        stat = stats.get(name)
        ipv4 = [a.address for a in addrs if a.family == socket.AF_INET]
        link_type = "loopback" if any(a.startswith("127.") for a in ipv4) else "ether"
        if Path(f"/sys/class/net/{name}/type").is_file():
            # ARPHRD_INFINIBAND = 32 (IPoIB), ARPHRD_LOOPBACK = 772
            kind = _read_text(Path(f"/sys/class/net/{name}/type"))
            link_type = {"32": "infiniband", "772": "loopback"}.get(kind, link_type)
        interfaces.append(NetInterface(name, bool(stat and stat.isup), link_type, ipv4))
    return interfaces, "psutil (no `ip` command)"


def _roce_v2_ipv4_gid(port_dir: Path) -> int | None:
    gids = port_dir / "gids"
    if not gids.is_dir():
        return None
    for entry in sorted(gids.iterdir(), key=lambda p: _natural_key(p.name)):
        gid = _read_text(entry)
        kind = _read_text(port_dir / "gid_attrs" / "types" / entry.name)
        if (
            kind == "RoCE v2"
            and gid.startswith("0000:0000:0000:0000:0000:ffff:")
            and not gid.endswith("0000:0000")
        ):
            return int(entry.name)
    return None


def _run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError:
        # Unused GID table entries and some attributes raise EINVAL on read in real sysfs.
        return ""


def _read_word(path: Path, last: bool) -> str:
    words = _read_text(path).split()
    if not words:
        return ""
    return words[-1] if last else words[0]


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]
