from pathlib import Path

from megatron_ext.launch.environment import derive_environment
from megatron_ext.launch.hardware import NetInterface, NodeTopology, detect_node

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "topology"


def h100_node() -> NodeTopology:
    return detect_node(
        str(FIXTURES / "nvidia_smi_topo_h100_sxm.txt"),
        str(FIXTURES / "sysfs_h100_ib"),
        str(FIXTURES / "ip_addr_h100.txt"),
    )


def derive(node, environ=None, **kwargs):
    options = dict(nnodes=4, nproc_per_node=8, tensor_parallel=8, rdzv_host="gpu01", num_cpus=128)
    options.update(kwargs)
    return derive_environment(node, environ=environ or {}, **options)


def test_h100_ib_node_environment_and_warnings():
    env = derive(h100_node())
    values = env.as_dict()
    # mlx5_3 is down and mlx5_8 / mlx5_9 are the Ethernet storage ports.
    assert (
        values["NCCL_IB_HCA"] == "=mlx5_0:1,mlx5_1:1,mlx5_2:1,mlx5_4:1,mlx5_5:1,mlx5_6:1,mlx5_7:1"
    )
    assert values["NCCL_IB_TIMEOUT"] == "22" and values["NCCL_IB_RETRY_CNT"] == "7"
    assert "NCCL_IB_GID_INDEX" not in values  # InfiniBand, not RoCE
    # Not lo, not the down eno1, not IPoIB ibp26s0, not docker0.
    assert values["NCCL_SOCKET_IFNAME"] == "=enp65s0f0np0"
    assert values["GLOO_SOCKET_IFNAME"] == "enp65s0f0np0"
    assert values["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
    assert values["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "3"
    assert values["OMP_NUM_THREADS"] == "16"  # 128 CPUs / 8 ranks
    assert all(c.source == "derived" and c.reason for c in env.choices)
    assert len(env.warnings) == 2
    assert env.warnings[0].startswith("mlx5_3:1 (InfiniBand) is DOWN")
    assert env.warnings[1].startswith("mlx5_9:1 (Ethernet) is DOWN")


def test_roce_node_gets_gid_index_from_sysfs():
    node = detect_node(
        str(FIXTURES / "nvidia_smi_topo_pcie_only.txt"),
        str(FIXTURES / "sysfs_roce"),
        str(FIXTURES / "ip_addr_roce.txt"),
    )
    env = derive(node, nproc_per_node=4, tensor_parallel=1)
    values = env.as_dict()
    assert values["NCCL_IB_HCA"] == "=mlx5_0:1,mlx5_1:1"
    assert values["NCCL_IB_GID_INDEX"] == "3"
    assert values["NCCL_SOCKET_IFNAME"] == "=ens1f0np0"
    assert "CUDA_DEVICE_MAX_CONNECTIONS" not in values  # TP=1
    assert env.warnings == []


def test_roce_without_ipv4_gid_falls_back_with_a_warning(tmp_path):
    port = tmp_path / "class" / "infiniband" / "mlx5_0" / "ports" / "1"
    port.mkdir(parents=True)
    (port / "state").write_text("4: ACTIVE\n")
    (port / "phys_state").write_text("5: LinkUp\n")
    (port / "link_layer").write_text("Ethernet\n")
    node = detect_node(None, str(tmp_path), str(FIXTURES / "ip_addr_roce.txt"))
    env = derive(node, nnodes=2, nproc_per_node=1, tensor_parallel=1)
    assert env.as_dict()["NCCL_IB_GID_INDEX"] == "3"
    assert any("is a guess" in w for w in env.warnings)


def test_all_ports_down_warns_about_socket_fallback():
    node = detect_node(None, str(FIXTURES / "sysfs_all_down"), str(FIXTURES / "ip_addr_h100.txt"))
    env = derive(node, nnodes=2, nproc_per_node=1, tensor_parallel=1)
    assert "NCCL_IB_HCA" not in env.as_dict()
    assert [w.split(" ")[0] for w in env.warnings[:2]] == ["mlx5_0:1", "mlx5_1:1"]
    assert "INIT" in env.warnings[1]
    assert "TCP sockets" in env.warnings[2] and "far slower" in env.warnings[2]


def test_user_environment_wins_and_is_reported():
    environ = {
        "NCCL_IB_HCA": "=mlx5_0:1",
        "NCCL_DEBUG": "INFO",
        "HOME": "/root",
        "NCCL_VERSION": "2.28.3-1",
    }
    env = derive(h100_node(), environ=environ, shutdown_timeout=300)
    by_name = {c.name: c for c in env.choices}
    assert by_name["NCCL_IB_HCA"].value == "=mlx5_0:1"
    assert by_name["NCCL_IB_HCA"].source == "user"
    assert "mlx5_7:1" in by_name["NCCL_IB_HCA"].reason  # what would have been derived
    assert by_name["NCCL_DEBUG"].source == "user"
    assert "HOME" not in by_name and "NCCL_VERSION" not in by_name
    assert by_name["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"].value == "300"


def test_loopback_rendezvous_uses_lo():
    env = derive(h100_node(), rdzv_host="127.0.0.1", nnodes=2)
    assert env.as_dict()["GLOO_SOCKET_IFNAME"] == "lo"


def test_route_to_rendezvous_host_picks_the_interface():
    interfaces = [
        NetInterface("eno2", True, "ether", ["172.20.8.5"]),
        NetInterface("ens1f0np0", True, "ether", ["10.0.1.5"]),
    ]
    node = NodeTopology(None, [], interfaces, {})
    env = derive(node, route_source_ip="10.0.1.5", nproc_per_node=1, tensor_parallel=1)
    assert env.as_dict()["NCCL_SOCKET_IFNAME"] == "=ens1f0np0"
    first = derive(node, nproc_per_node=1, tensor_parallel=1)
    assert first.as_dict()["NCCL_SOCKET_IFNAME"] == "=eno2"


def test_no_usable_interface_is_a_warning_for_multi_node():
    node = NodeTopology(None, [], [NetInterface("docker0", True, "ether", ["172.17.0.1"])], {})
    env = derive(node, nnodes=2, nproc_per_node=1, tensor_parallel=1)
    assert "NCCL_SOCKET_IFNAME" not in env.as_dict()
    assert any("bootstrap" in w for w in env.warnings)
