import shlex
from pathlib import Path

import pytest

from megatron_ext.launch import plan
from megatron_ext.launch.hardware import detect_node

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "topology"
SLURM_ENV = {"SLURM_JOB_NODELIST": "gpu[01-04]", "SLURM_JOB_NUM_NODES": "4", "SLURM_JOB_ID": "4242"}


def torchrun_options(argv: list[str]) -> dict[str, str]:
    cut = argv.index("-m")
    return dict(a[2:].split("=", 1) for a in argv[1:cut])


def test_four_nodes_of_eight_every_node_gets_its_rank_and_the_same_rendezvous():
    spec = plan.spec_from_slurm(SLURM_ENV, ["--config", "x.yaml"], 8, "test")
    nodes = plan.plan_nodes(spec, ["torchrun"])
    assert spec.world_size == 32
    assert [n.host for n in nodes] == ["gpu01", "gpu02", "gpu03", "gpu04"]
    for rank, node in enumerate(nodes):
        options = torchrun_options(node.argv)
        assert options["nnodes"] == "4" and options["nproc-per-node"] == "8"
        assert options["node-rank"] == str(rank)
        assert options["rdzv-backend"] == "c10d"
        assert options["rdzv-endpoint"] == "gpu01:29742"  # 29500 + 4242 mod 1000
        assert options["rdzv-id"] == "4242"
        assert options["rdzv-conf"] == f"is_host={int(rank == 0)}"
        assert "SIGUSR1" in options["signals-to-handle"].split(",")
        assert node.argv[-4:] == ["-m", "megatron_ext.train", "--config", "x.yaml"]
        assert node.global_ranks == range(8 * rank, 8 * rank + 8)


def test_global_ranks_follow_host_name_order_like_c10d():
    env = dict(SLURM_ENV, SLURM_JOB_NODELIST="node[9-11]", SLURM_JOB_NUM_NODES="3")
    spec = plan.spec_from_slurm(env, [], 2, "test")
    nodes = plan.plan_nodes(spec, ["torchrun"])
    # "node10" < "node11" < "node9" as strings: node rank 0 (node9) holds the last ranks.
    assert [(n.host, list(n.global_ranks)) for n in nodes] == [
        ("node9", [4, 5]),
        ("node10", [0, 1]),
        ("node11", [2, 3]),
    ]


def test_slurm_inputs_are_checked():
    with pytest.raises(ValueError, match="SLURM_JOB_NODELIST"):
        plan.spec_from_slurm({}, [], 8, "test")
    with pytest.raises(ValueError, match="names 4 hosts"):
        plan.spec_from_slurm(dict(SLURM_ENV, SLURM_JOB_NUM_NODES="2"), [], 8, "test")
    spec = plan.spec_from_slurm(SLURM_ENV, [], 8, "test", port=6000)
    with pytest.raises(ValueError, match="outside 0..3"):
        plan.build_torchrun_argv(spec, 4, ["torchrun"])


def test_script_entry_and_ranks_per_node_resolution():
    spec = plan.LaunchSpec(
        nnodes=1,
        nproc_per_node=1,
        rdzv_host="127.0.0.1",
        rdzv_port=1,
        rdzv_id="x",
        train_args=["a"],
        entry="tools/run.py",
    )
    assert plan.build_torchrun_argv(spec, 0, ["torchrun"])[-2:] == ["tools/run.py", "a"]
    h100 = detect_node(str(FIXTURES / "nvidia_smi_topo_h100_sxm.txt"), str(FIXTURES), None)
    assert plan.resolve_nproc_per_node(None, h100, {})[0] == 8
    assert plan.resolve_nproc_per_node(None, h100, {"SLURM_GPUS_ON_NODE": "4"})[0] == 4
    assert plan.resolve_nproc_per_node(None, h100, {"SLURM_GPUS_PER_NODE": "h100:2"})[0] == 2
    assert plan.resolve_nproc_per_node("3", h100, {"SLURM_GPUS_ON_NODE": "4"})[0] == 3
    cpu = detect_node(None, str(FIXTURES), str(FIXTURES / "ip_addr_roce.txt"))
    cpu.gpus = None
    assert plan.resolve_nproc_per_node("auto", cpu, {}) == (
        1,
        "no GPU found: one CPU rank per node (gloo backend)",
    )


def test_dry_run_prints_every_node_with_environment(tmp_path, monkeypatch, capsys):
    config = tmp_path / "exp.yaml"
    config.write_text("parallel:\n  tensor_model_parallel_size: 16\n")
    for name, value in SLURM_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("NCCL_IB_TIMEOUT", "18")
    code = plan.main(
        [
            "--slurm",
            "--dry-run",
            "--nproc-per-node",
            "8",
            "--nvidia-smi-topo",
            str(FIXTURES / "nvidia_smi_topo_h100_sxm.txt"),
            "--sysfs-root",
            str(FIXTURES / "sysfs_h100_ib"),
            "--ip-addr",
            str(FIXTURES / "ip_addr_h100.txt"),
            "--",
            "--config",
            str(config),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    commands = [shlex.split(line) for line in out.splitlines() if "--rdzv-backend=c10d" in line]
    assert [torchrun_options(c)["node-rank"] for c in commands] == ["0", "1", "2", "3"]
    assert out.count("export NCCL_IB_HCA==mlx5_0:1,mlx5_1:1,mlx5_2:1,mlx5_4:1,") == 4
    assert out.count("export NCCL_IB_TIMEOUT=18  # [user] set in your environment") == 4
    assert out.count("WARNING: TP=16 is larger than the 8 ranks per node") == 4
    assert "# node 3 of 4 (gpu04): global ranks 24-31 of world size 32" in out


def test_bad_config_is_a_message_not_a_traceback(tmp_path, capsys):
    code = plan.main(["--dry-run", "--", "--config", str(tmp_path / "missing.yaml")])
    assert code == 2
    assert "missing.yaml" in capsys.readouterr().err


def test_node_rank_outside_the_job_is_refused_before_starting(monkeypatch, capsys):
    monkeypatch.delenv("DRY_RUN", raising=False)
    for name, value in SLURM_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("SLURM_NODEID", "4")
    assert (
        plan.main(
            ["--slurm", "--nproc-per-node", "8", "--ip-addr", str(FIXTURES / "ip_addr_h100.txt")]
        )
        == 2
    )
    assert "SLURM_NODEID=4 is not a node rank in 0..3" in capsys.readouterr().err
    monkeypatch.delenv("SLURM_NODEID")
    assert (
        plan.main(
            ["--slurm", "--nproc-per-node", "8", "--ip-addr", str(FIXTURES / "ip_addr_h100.txt")]
        )
        == 2
    )
    assert "SLURM_NODEID; it is not set" in capsys.readouterr().err


def test_single_node_dry_run_says_which_port_it_takes(tmp_path, monkeypatch, capsys):
    config = tmp_path / "exp.yaml"
    config.write_text("parallel:\n  tensor_model_parallel_size: 1\n")
    argv = ["--dry-run", "--nproc-per-node", "1", "--", "--config", str(config)]
    monkeypatch.delenv("MASTER_PORT", raising=False)
    assert plan.main(argv) == 0
    assert "this machine, a free port" in capsys.readouterr().out
    monkeypatch.setenv("MASTER_PORT", "29123")
    assert plan.main(argv) == 0
    out = capsys.readouterr().out
    assert "this machine, the given port" in out and "127.0.0.1:29123" in out
