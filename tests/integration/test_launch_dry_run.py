"""The launch scripts in dry-run mode, end to end, on recorded H100 topology (no SLURM needed)."""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures" / "topology"


def clean_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "NCCL_", "TORCH_NCCL_", "GLOO_", "LAUNCH_"))
        and k
        not in (
            "DRY_RUN",
            "OMP_NUM_THREADS",
            "MASTER_PORT",
            "NPROC_PER_NODE",
            "CUDA_DEVICE_MAX_CONNECTIONS",
        )
    }
    env["PYTHON"] = sys.executable
    env.update(extra)
    return env


def h100_fixture_env() -> dict[str, str]:
    return {
        "LAUNCH_NVIDIA_SMI_TOPO": str(FIXTURES / "nvidia_smi_topo_h100_sxm.txt"),
        "LAUNCH_SYSFS_ROOT": str(FIXTURES / "sysfs_h100_ib"),
        "LAUNCH_IP_ADDR": str(FIXTURES / "ip_addr_h100.txt"),
    }


def run(cmd: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=60)


def torchrun_lines(stdout: str) -> list[list[str]]:
    return [
        shlex.split(line)
        for line in stdout.splitlines()
        if not line.startswith(("#", "export")) and "--rdzv-backend=c10d" in line
    ]


def options(argv: list[str]) -> dict[str, str]:
    return dict(a[2:].split("=", 1) for a in argv[1 : argv.index("-m")])


def test_slurm_script_dry_run_four_nodes_of_eight_gpus(tmp_path):
    config = tmp_path / "exp.yaml"
    config.write_text(
        "parallel:\n  tensor_model_parallel_size: 8\n  pipeline_model_parallel_size: 2\n"
    )
    env = clean_env(
        DRY_RUN="1",
        SLURM_JOB_NODELIST="h100-[07-09,12]",
        SLURM_JOB_ID="31337",
        SLURM_JOB_NUM_NODES="4",
        SLURM_GPUS_ON_NODE="8",
        **h100_fixture_env(),
    )
    result = run(
        ["bash", str(REPO / "launch" / "slurm_multi_node.sbatch"), "--config", str(config)],
        env,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    commands = torchrun_lines(result.stdout)
    assert len(commands) == 4
    for rank, argv in enumerate(commands):
        opts = options(argv)
        assert Path(argv[0]).name in ("torchrun", "python", "python3")
        assert (opts["nnodes"], opts["nproc-per-node"], opts["node-rank"]) == ("4", "8", str(rank))
        assert opts["rdzv-backend"] == "c10d"
        assert opts["rdzv-endpoint"] == "h100-07:29837"
        assert opts["rdzv-id"] == "31337"
        assert argv[argv.index("-m") + 1] == "megatron_ext.train"
        # The config names no run directory: one per job, kept across requeues.
        assert argv[-1] == "--run_dir=runs/megatron_ext-31337"
    out = result.stdout
    hosts = ["h100-07", "h100-08", "h100-09", "h100-12"]
    for rank, host in enumerate(hosts):
        assert (
            f"# node {rank} of 4 ({host}): global ranks {8 * rank}-{8 * rank + 7} of world size 32"
        ) in out
    assert out.count("note: world size 32 = TP 8 x PP 2 x DP 2") == 4
    assert out.count("export CUDA_DEVICE_MAX_CONNECTIONS=1") == 4
    assert out.count("WARNING: mlx5_3:1 (InfiniBand) is DOWN") == 4
    assert "# would run: srun --ntasks-per-node=1" in out
    assert "# run directory: runs/megatron_ext-31337 (the config names none" in out
    # A config that names one keeps it, for every submission (a resubmitted job resumes).
    config.write_text(config.read_text() + "run_dir: runs/exp7\n")
    result = run(
        ["bash", str(REPO / "launch" / "slurm_multi_node.sbatch"), "--config", str(config)],
        env,
        tmp_path,
    )
    assert "# run directory: runs/exp7, the config's" in result.stdout
    assert all("--run_dir" not in " ".join(argv) for argv in torchrun_lines(result.stdout))
    assert not (tmp_path / "logs").exists()  # nothing created, nothing started


def test_slurm_dry_run_outside_a_job_takes_the_scripts_gpu_request(tmp_path):
    """On a login node SLURM sets no GPU count: the dry run uses the script's own
    `#SBATCH --gpus-per-node`, not the (absent) GPUs of the machine it runs on."""
    env = clean_env(DRY_RUN="1", SLURM_JOB_NODELIST="gpu[01-02]", SLURM_JOB_ID="7")
    config = REPO / "examples" / "configs" / "tiny_cpu.yaml"
    command = ["bash", str(REPO / "launch" / "slurm_multi_node.sbatch"), "--config", str(config)]
    result = run(command, env, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "# ranks per node: 8, this script's #SBATCH --gpus-per-node" in result.stdout
    assert [options(argv)["nproc-per-node"] for argv in torchrun_lines(result.stdout)] == ["8"] * 2


def test_single_node_script_dry_run_on_this_machine(tmp_path):
    env = clean_env(DRY_RUN="1", OMP_NUM_THREADS="3")
    result = run(
        [
            "bash",
            str(REPO / "launch" / "torchrun_node.sh"),
            "--",
            "--config",
            "examples/configs/tiny_cpu.yaml",
        ],
        env,
        REPO,
    )
    assert result.returncode == 0, result.stderr
    (argv,) = torchrun_lines(result.stdout)
    opts = options(argv)
    assert opts["nnodes"] == "1" and opts["node-rank"] == "0"
    # A free port of this machine, drawn below the ephemeral range (29500 could be another job's).
    host, port = opts["rdzv-endpoint"].split(":")
    from megatron_ext.parallel.ports import EPHEMERAL_RANGE_FILE, LISTEN_PORTS_BELOW

    low = int(Path(EPHEMERAL_RANGE_FILE).read_text().split()[0])
    assert host == "127.0.0.1" and low - LISTEN_PORTS_BELOW <= int(port) < low
    assert "export OMP_NUM_THREADS=3  # [user] set in your environment" in result.stdout


def test_manual_multi_node_needs_an_endpoint(tmp_path):
    result = run(
        ["bash", str(REPO / "launch" / "torchrun_node.sh"), "--dry-run", "--nnodes", "2"],
        clean_env(),
        tmp_path,
    )
    assert result.returncode == 2
    assert "--rdzv-endpoint" in result.stderr


def test_topology_cli_json_on_recorded_roce_node(tmp_path):
    roce_node = [
        "--nvidia-smi-topo",
        str(FIXTURES / "nvidia_smi_topo_pcie_only.txt"),
        "--sysfs-root",
        str(FIXTURES / "sysfs_roce"),
        "--ip-addr",
        str(FIXTURES / "ip_addr_roce.txt"),
    ]
    result = run(
        [
            sys.executable,
            "-m",
            "megatron_ext.launch.topology",
            "--format",
            "json",
            "--nnodes",
            "2",
            "--tp",
            "2",
            *roce_node,
        ],
        clean_env(),
        REPO,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    env = {c["name"]: c["value"] for c in report["environment"]}
    assert env["NCCL_IB_HCA"] == "=mlx5_0:1,mlx5_1:1" and env["NCCL_IB_GID_INDEX"] == "3"
    assert report["warnings"] == [
        "TP=2 on GPUs without NVLink between them: tensor-parallel all-reduces run over PCIe; "
        "prefer TP=1 with more PP / DP on this hardware"
    ]
    strict = run(
        [
            sys.executable,
            "-m",
            "megatron_ext.launch.topology",
            "--strict",
            "--tp",
            "2",
            *roce_node,
        ],
        clean_env(),
        REPO,
    )
    assert strict.returncode == 1 and "WARNING: TP=2 on GPUs without NVLink" in strict.stdout
