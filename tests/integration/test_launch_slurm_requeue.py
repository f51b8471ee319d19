"""The SLURM batch script's signal handling, with stand-ins for `srun` / `scontrol` on PATH.

SLURM is not available here; the stand-ins record what the script asks of them, so the script's
own logic (pass SIGUSR1 on to srun, wait for the ranks to finish, requeue) is what is tested.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

FAKE_SRUN = """#!/usr/bin/env bash
echo "$@" > "$RECORD/srun_args"
on_signal() { echo "$1" > "$RECORD/srun_signal"; exit 0; }
trap 'on_signal USR1' USR1
trap 'on_signal TERM' TERM
touch "$RECORD/srun_ready"
while :; do sleep 0.1; done
"""

FAKE_SCONTROL = """#!/usr/bin/env bash
echo "$@" >> "$RECORD/scontrol_calls"
"""


def start_batch(tmp_path: Path) -> subprocess.Popen:
    """The batch script as SLURM runs it: a copy in slurmd's spool directory, started in the
    submission directory (``SLURM_SUBMIT_DIR``), which holds the repository."""
    spool = tmp_path / "spool" / "job555"
    spool.mkdir(parents=True)
    script = spool / "slurm_script"
    script.write_text((REPO / "launch" / "slurm_multi_node.sbatch").read_text())
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k != "DRY_RUN"}
    env.update(
        PATH=f"{bin_dir}:{env['PATH']}",
        RECORD=str(tmp_path),
        PYTHON=sys.executable,
        SLURM_JOB_ID="555",
        SLURM_JOB_NODELIST="gpu[01-02]",
        SLURM_JOB_NAME="exp",
        SLURM_CPUS_PER_TASK="32",
        SLURM_SUBMIT_DIR=str(REPO),
        RUN_DIR="runs/exp1",
    )
    proc = subprocess.Popen(
        ["bash", str(script), "--config", "recipe.yaml"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 30
    while not (tmp_path / "srun_ready").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
        time.sleep(0.05)
    return proc


@pytest.mark.parametrize("sig, requeued", [(signal.SIGUSR1, True), (signal.SIGTERM, False)])
def test_signal_is_passed_to_srun_and_usr1_requeues(tmp_path, sig, requeued):
    proc = start_batch(tmp_path)
    try:
        os.kill(proc.pid, sig)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out
    assert (tmp_path / "srun_signal").read_text().strip() == sig.name[3:]
    srun_args = (tmp_path / "srun_args").read_text().split()
    assert srun_args[:5] == [
        "--ntasks-per-node=1",
        "--kill-on-bad-exit=1",
        "--open-mode=append",
        "--output=logs/%x-%j-node%n.out",
        "--cpus-per-task=32",
    ]
    assert srun_args[6:] == [
        "-m",
        "megatron_ext.launch.plan",
        "--slurm",
        "--",
        "--config",
        "recipe.yaml",
        "--run_dir=runs/exp1",
    ]
    assert (tmp_path / "logs").is_dir()
    calls = tmp_path / "scontrol_calls"
    if requeued:
        assert calls.read_text().split() == ["requeue", "555"]
        assert "requeueing" in out
    else:
        assert not calls.exists()
