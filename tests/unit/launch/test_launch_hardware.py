from pathlib import Path

import pytest

from megatron_ext.launch.hardware import parse_ip_addr, parse_nvidia_smi_topo, read_ib_ports

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "topology"


def test_h100_sxm_topology_is_one_nvlink_domain_of_eight():
    topo = parse_nvidia_smi_topo((FIXTURES / "nvidia_smi_topo_h100_sxm.txt").read_text())
    assert topo.num_gpus == 8
    assert topo.links[0][0] == "X"
    assert {topo.nvlink_count(0, j) for j in range(1, 8)} == {18}
    assert topo.nvlink_domains() == [list(range(8))]
    assert topo.cpu_affinity[0] == "0-63,128-191" and topo.cpu_affinity[7] == "64-127,192-255"
    assert topo.numa_affinity == ["0"] * 4 + ["1"] * 4
    assert topo.nic_names == [f"mlx5_{i}" for i in range(10)]


def test_pcie_only_node_has_no_nvlink():
    topo = parse_nvidia_smi_topo((FIXTURES / "nvidia_smi_topo_pcie_only.txt").read_text())
    assert topo.num_gpus == 4
    assert topo.nvlink_count(0, 1) == 0
    assert topo.nvlink_domains() == [[0], [1], [2], [3]]
    assert topo.nic_names == ["mlx5_0", "mlx5_1"]


def test_header_without_terminal_underline_codes_parses_too():
    text = (FIXTURES / "nvidia_smi_topo_h100_sxm.txt").read_text()
    assert "\x1b[4m" in text  # as nvidia-smi writes it
    plain = text.replace("\x1b[4m", "").replace("\x1b[0m", "")
    assert parse_nvidia_smi_topo(plain).nvlink_domains() == [list(range(8))]


def test_nvlink_pairs_form_separate_domains():
    text = "\tGPU0\tGPU1\tGPU2\tGPU3\tCPU Affinity\tNUMA Affinity\n" + "\n".join(
        [
            "GPU0\t X \tNV4\tSYS\tSYS\t0-15\t0",
            "GPU1\tNV4\t X \tSYS\tSYS\t0-15\t0",
            "GPU2\tSYS\tSYS\t X \tNV4\t16-31\t1",
            "GPU3\tSYS\tSYS\tNV4\t X \t16-31\t1",
        ]
    )
    assert parse_nvidia_smi_topo(text).nvlink_domains() == [[0, 1], [2, 3]]


def test_unparseable_topology_is_a_clear_error():
    with pytest.raises(ValueError, match="GPU0"):
        parse_nvidia_smi_topo("NVIDIA-SMI has failed because it couldn't communicate")


def test_infiniband_ports_states_and_roce_gid():
    ports = {p.hca: p for p in read_ib_ports(FIXTURES / "sysfs_h100_ib")}
    assert list(ports) == [f"mlx5_{i}" for i in range(10)]
    assert ports["mlx5_0"].is_active and ports["mlx5_0"].link_layer == "InfiniBand"
    assert ports["mlx5_0"].rate == "400 Gb/sec (4X NDR)"
    assert ports["mlx5_3"].state == "DOWN" and ports["mlx5_3"].phys_state == "Disabled"
    assert ports["mlx5_8"].is_roce and ports["mlx5_8"].roce_v2_ipv4_gid_index == 3
    assert ports["mlx5_9"].roce_v2_ipv4_gid_index is None  # no IPv4 GID on a down port


def test_missing_sysfs_class_means_no_ports(tmp_path):
    assert read_ib_ports(tmp_path) == []


def test_ip_addr_listing():
    interfaces = {i.name: i for i in parse_ip_addr((FIXTURES / "ip_addr_h100.txt").read_text())}
    assert interfaces["lo"].link_type == "loopback" and interfaces["lo"].is_up
    assert interfaces["eno1"].is_up is False  # NO-CARRIER
    assert interfaces["enp65s0f0np0"].ipv4 == ["10.20.3.17"]
    assert interfaces["ibp26s0"].link_type == "infiniband"
    assert "veth3f2a1c9" in interfaces  # the @ifN suffix is not part of the name


def test_output_recorded_on_a_one_gpu_h100_machine():
    # Recorded as is: nvidia-smi underlines the header even when writing to a file.
    text = (FIXTURES / "nvidia_smi_topo_h100_1gpu_recorded.txt").read_text()
    assert "\x1b[4m" in text
    topo = parse_nvidia_smi_topo(text)
    assert topo.num_gpus == 1 and topo.links == [["X"]]
    assert (topo.cpu_affinity, topo.numa_affinity, topo.nic_names) == (["0-15"], ["0"], [])
