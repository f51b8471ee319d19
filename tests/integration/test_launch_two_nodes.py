"""Two launcher invocations on this machine act as a 2-node job (node ranks 0 and 1, gloo, CPU).

The rendezvous endpoint is 127.0.0.1, so the launcher binds gloo to the loopback interface.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LAUNCHER = REPO / "launch" / "torchrun_node.sh"

ALL_REDUCE_WORKER = """
import json, os, sys
import torch
import torch.distributed as dist

dist.init_process_group("gloo")
rank = dist.get_rank()
value = torch.tensor([float(rank + 1)])
dist.all_reduce(value)
hosts = [None] * dist.get_world_size()
dist.all_gather_object(hosts, os.environ["GROUP_RANK"])
with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as f:
    json.dump({"rank": rank, "world_size": dist.get_world_size(), "sum": value.item(),
               "group_ranks": hosts, "run_id": os.environ["TORCHELASTIC_RUN_ID"],
               "gloo_ifname": os.environ.get("GLOO_SOCKET_IFNAME"),
               "async_error_handling": os.environ.get("TORCH_NCCL_ASYNC_ERROR_HANDLING"),
               "shutdown_timeout": os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT")}, f)
dist.destroy_process_group()
"""

SIGNAL_WORKER = """
import os, signal, sys, time
received = []
signal.signal(signal.SIGUSR1, lambda signum, frame: received.append(signum))
open(os.path.join(sys.argv[1], "ready"), "w").close()
deadline = time.monotonic() + 60
while not received and time.monotonic() < deadline:
    time.sleep(0.05)
# Stands in for the training loop: save (taking argv[2] seconds), then exit 0.
time.sleep(float(sys.argv[2]))
with open(os.path.join(sys.argv[1], "saved"), "w") as f:
    f.write(signal.Signals(received[0]).name if received else "no signal")
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "NCCL_", "GLOO_", "TORCH_NCCL_", "LAUNCH_"))
        and k not in ("DRY_RUN", "NODE_RANK", "NPROC_PER_NODE", "MASTER_PORT")
    }
    env["PYTHON"] = sys.executable
    env["OMP_NUM_THREADS"] = "1"
    return env


def start_node(
    node_rank: int, port: int, launcher_args: list[str], train_args: list[str], log: Path
) -> subprocess.Popen:
    cmd = [
        "bash",
        str(LAUNCHER),
        "--nnodes",
        "2",
        "--node-rank",
        str(node_rank),
        "--nproc-per-node",
        "1",
        "--rdzv-endpoint",
        f"127.0.0.1:{port}",
        "--rdzv-id",
        "two-node-test",
        *launcher_args,
        "--",
        *train_args,
    ]
    return subprocess.Popen(
        cmd, cwd=REPO, env=launcher_env(), stdout=log.open("w"), stderr=subprocess.STDOUT
    )


def run_two_nodes(
    tmp_path: Path, launcher_args: list[str], train_args: list[str], timeout: float
) -> None:
    port = free_port()
    logs = [tmp_path / f"node{r}.log" for r in (0, 1)]
    procs = [start_node(r, port, launcher_args, train_args, logs[r]) for r in (0, 1)]
    try:
        codes = [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert codes == [0, 0], "\n".join(log.read_text()[-3000:] for log in logs)


def test_two_nodes_all_reduce_over_gloo(tmp_path):
    script = tmp_path / "all_reduce_worker.py"
    script.write_text(ALL_REDUCE_WORKER)
    out = tmp_path / "out"
    out.mkdir()
    run_two_nodes(tmp_path, ["--entry", str(script)], [str(out)], timeout=120)
    results = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    for result in results:
        assert result["world_size"] == 2
        assert result["sum"] == 3.0  # (0 + 1) + (1 + 1): both nodes took part
        assert sorted(result["group_ranks"]) == ["0", "1"]  # one rank on each node
        assert result["run_id"] == "two-node-test"
        assert result["gloo_ifname"] == "lo"  # derived by the launcher from the endpoint
        assert result["async_error_handling"] == "3"
        assert result["shutdown_timeout"] == "240"
    assert sorted(r["rank"] for r in results) == [0, 1]
    node0_log = (tmp_path / "node0.log").read_text()
    assert "# node 0 of 2: global ranks 0-0 of world size 2" in node0_log


def signal_one_node(tmp_path: Path, shutdown_timeout: int, save_seconds: float) -> str:
    """Start one node running SIGNAL_WORKER, send SIGUSR1 to the launcher; returns its log."""
    script = tmp_path / "signal_worker.py"
    script.write_text(SIGNAL_WORKER)
    log = tmp_path / "node.log"
    cmd = [
        "bash",
        str(LAUNCHER),
        "--nproc-per-node",
        "1",
        "--rdzv-endpoint",
        f"127.0.0.1:{free_port()}",
        "--shutdown-timeout",
        str(shutdown_timeout),
        "--entry",
        str(script),
        "--",
        str(tmp_path),
        str(save_seconds),
    ]
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=launcher_env(), stdout=log.open("w"), stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "ready").exists():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        # The launcher exec'd into torchrun: this pid is torchrun, as under srun.
        os.kill(proc.pid, signal.SIGUSR1)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return log.read_text()


def test_sigusr1_reaches_the_training_ranks(tmp_path):
    log = signal_one_node(tmp_path, shutdown_timeout=240, save_seconds=0.5)
    assert (tmp_path / "saved").read_text() == "SIGUSR1"
    assert "got signal: 10" in log  # torchrun forwarded it, then stopped


def test_ranks_slower_than_the_shutdown_timeout_are_killed(tmp_path):
    # Shows that the launcher's shutdown timeout reaches torchrun: 1 s is not enough to "save".
    log = signal_one_node(tmp_path, shutdown_timeout=1, save_seconds=20)
    assert not (tmp_path / "saved").exists()
    assert re.search(r"Unable to shutdown process \d+ via 10, forcefully exiting via 9", log)


TINY_CONFIG = REPO / "examples" / "configs" / "tiny_cpu.yaml"


def test_two_nodes_train_tiny_config_and_agree_on_the_loss(tmp_path, token_dataset):
    def losses(run_dir: Path) -> dict[int, float]:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines if line.strip()]
        return {r["step"]: r["loss"] for r in records if "loss" in r}

    # One pipeline stage per "node"; the data is the shared synthetic token dataset.
    train = [
        "--config",
        str(TINY_CONFIG),
        "--schedule.train_steps=3",
        "--schedule.lr_warmup_steps=1",
        f"--data.data_path=[{token_dataset}]",
        "--tokenizer.tokenizer_type=none",
        "--model.vocab_size=256",
        "--parallel.device=cpu",
        "--parallel.tensor_model_parallel_size=1",
        "--parallel.pipeline_model_parallel_size=2",
        "--parallel.sequence_parallel=false",
        "--monitoring.wandb=false",
        "--monitoring.tensorboard=false",
        "--checkpoint.interval=0",
        "--checkpoint.save_on_exit=false",
    ]
    two_nodes = tmp_path / "two_nodes"
    run_two_nodes(tmp_path, [], [*train, f"--run_dir={two_nodes}"], timeout=300)
    # Reference: the same world size (2 ranks) on one node.
    one_node = tmp_path / "one_node"
    single = subprocess.run(
        [
            "bash",
            str(LAUNCHER),
            "--nproc-per-node",
            "2",
            "--rdzv-endpoint",
            f"127.0.0.1:{free_port()}",
            "--",
            *train,
            f"--run_dir={one_node}",
        ],
        cwd=REPO,
        env=launcher_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert single.returncode == 0, single.stdout[-3000:]
    got, expected = losses(two_nodes), losses(one_node)
    assert len(got) == 3 and got.keys() == expected.keys()
    for step in got:
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), step
