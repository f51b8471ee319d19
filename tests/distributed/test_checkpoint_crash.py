"""A writer killed in the middle of a save, then resumed; exact single-layout resume; refusals.

Each scenario runs in a fresh Python process (a gloo process group of one, the real
dist_checkpointing save and load) started from this file: ``python test_checkpoint_crash.py MODE
DIR``. The writer saves a model of ~45M parameters (about 0.7 GB with the optimizer state) so
that the parent can SIGKILL it while the files of its second save are being written.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_ext.training.schedule_config import ScheduleConfig
from tests.distributed.small_trainer import SmallTrainer

# Warmup over 2 steps to 1e-3, then cosine to 1e-4 at step 10, built as the training loop builds it.
SCHEDULE = ScheduleConfig(lr=1e-3, min_lr_ratio=0.1, lr_warmup_steps=2, train_steps=10)
BIG = {
    "num_layers": 4,
    "hidden_size": 512,
    "ffn_hidden_size": 1408,
    "num_attention_heads": 8,
    "num_query_groups": 4,
    "vocab_size": 32000,
}
SEQ = 32
REPO_ROOT = str(Path(__file__).resolve().parents[2])


class _Run(SmallTrainer):
    """Model, optimizer and scheduler on a one-process gloo group."""

    def __init__(self, model_fields: dict, seed: int):
        import torch

        from megatron_ext.models.config import ModelConfig, PrecisionConfig
        from megatron_ext.parallel.config import ParallelConfig
        from megatron_ext.training.optimizer import OptimizerConfig

        torch.manual_seed(seed)
        model_cfg = ModelConfig(**model_fields)
        super().__init__(
            ParallelConfig(device="cpu"),
            model_cfg,
            PrecisionConfig(),
            OptimizerConfig(),
            SCHEDULE,
            seed,
        )
        self.vocab = model_cfg.vocab_size
        self.config = {"seed": 1234, "model": dict(model_fields), "schedule": {"train_steps": 10}}

    def train(self, step: int) -> tuple[float, float]:
        import torch

        from megatron_ext.data.batches import split_micro_batches

        gen = torch.Generator().manual_seed(step)
        tokens = torch.randint(0, self.vocab, (4, SEQ + 1), generator=gen)
        result = self.train_on(split_micro_batches(tokens, 2), SEQ)
        return result.loss, result.grad_norm

    def save(self, cfg, step: int) -> Path:
        from megatron_ext.checkpoint.manager import save_checkpoint

        return save_checkpoint(
            cfg,
            cfg.save_dir,
            step,
            self.model,
            self.optimizer,
            self.scheduler,
            {"consumed_tokens": step * 4 * SEQ},
            self.config,
            self.ctx,
        )

    def load(self, cfg, config: dict | None = None, run_dir: Path | None = None):
        from megatron_ext.checkpoint.manager import load_checkpoint

        return load_checkpoint(
            cfg,
            run_dir or cfg.save_dir,
            self.model,
            self.optimizer,
            self.scheduler,
            self.ctx,
            config or self.config,
        )

    def weights_sum(self) -> float:
        return float(sum(p.double().sum() for p in self.model[0].parameters()))


def _draws() -> list:
    import random

    import numpy as np
    import torch
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    with get_cuda_rng_tracker().fork():
        forked = torch.rand(3).tolist()
    return [random.random(), float(np.random.rand()), torch.rand(3).tolist(), forked]


def _writer(root: Path) -> None:
    """Save step 1, then step 2 (the parent kills this process during the second save)."""
    from megatron_ext.checkpoint.config import CheckpointConfig

    run = _Run(BIG, seed=1234)
    cfg = CheckpointConfig(save_dir=str(root / "crash"))
    run.save(cfg, 1)
    (root / "writer.json").write_text(json.dumps({"weights_sum": run.weights_sum()}))
    run.save(cfg, 2)


def _resume(root: Path) -> None:
    """Resume after the crash, then exact resume, refusals and finetuning on a tiny model."""
    from megatron_ext.checkpoint.config import CheckpointConfig
    from megatron_ext.checkpoint.directory import CheckpointError
    from megatron_ext.config.errors import ConfigError
    from megatron_ext.parallel.init import destroy_parallel

    out: dict = {}
    cfg = CheckpointConfig(save_dir=str(root / "crash"))
    run = _Run(BIG, seed=99)
    out["crash_state"] = run.load(cfg)
    out["crash_weights_sum"] = run.weights_sum()
    out["crash_listing"] = sorted(p.name for p in (root / "crash").iterdir())
    destroy_parallel()

    tiny = {"vocab_size": 512, "num_layers": 2}
    cfg = CheckpointConfig(save_dir=str(root / "exact"))
    run = _Run(tiny, seed=5)
    run.train(1)
    run.train(2)
    run.save(cfg, 2)
    out["draws_a"] = _draws()
    out["step3_a"] = run.train(3)
    out["step4_a"] = run.train(4)  # needs the optimizer state (moments, Adam step) restored
    destroy_parallel()

    run = _Run(tiny, seed=6)
    changed = dict(run.config, model=dict(tiny, num_layers=3), schedule={"train_steps": 20})
    try:
        run.load(cfg, changed)
    except ConfigError as exc:
        out["refused_fields"] = sorted(exc.fields())
    out["state"] = run.load(cfg)
    out["draws_b"] = _draws()
    out["step3_b"] = run.train(3)
    out["step4_b"] = run.train(4)
    destroy_parallel()

    run = _Run(tiny, seed=7)
    finetune = CheckpointConfig(load=str(root / "exact"), finetune=True)
    out["finetune_state"] = run.load(finetune, run_dir=root / "finetune_run")
    out["finetune_lr"] = run.optimizer.param_groups[0]["lr"]
    out["finetune_step3"] = run.train(3)
    destroy_parallel()

    bad = next((root / "exact" / "iter_0000002").glob("*.distcp"))
    bad.write_bytes(bad.read_bytes()[:50])
    run = _Run(tiny, seed=8)
    try:
        run.load(cfg)
    except CheckpointError as exc:
        out["corrupt_error"] = str(exc)
    destroy_parallel()
    (root / "resume.json").write_text(json.dumps(out))


def _start(mode: str, root: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    env["PYTHONWARNINGS"] = "ignore"
    # The script imports tests.distributed.small_trainer, as the test itself does.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO_ROOT, env.get("PYTHONPATH")]))
    return subprocess.Popen(
        [sys.executable, __file__, mode, str(root)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _kill_during_second_save(proc: subprocess.Popen, save_dir: Path, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        temps = list(save_dir.glob("iter_0000002.tmp-*")) if save_dir.is_dir() else []
        if temps and any(temps[0].glob("*.distcp")):
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return temps[0].name
        time.sleep(0.002)
    proc.kill()
    output = proc.communicate()[0]
    raise AssertionError(f"the writer never reached its second save:\n{output[-3000:]}")


@pytest.mark.timeout(600)
def test_checkpoint_sigkill_during_save_then_resume(tmp_path):
    writer = _start("writer", tmp_path)
    killed_in = _kill_during_second_save(writer, tmp_path / "crash", timeout=400)
    save_dir = tmp_path / "crash"
    assert (save_dir / "latest").read_text().strip() == "iter_0000001"
    assert not (save_dir / "iter_0000002").exists()
    assert (save_dir / killed_in).is_dir()

    resume = _start("resume", tmp_path)
    output = resume.communicate(timeout=500)[0]
    assert resume.returncode == 0, output[-5000:]
    out = json.loads((tmp_path / "resume.json").read_text())
    written = json.loads((tmp_path / "writer.json").read_text())

    # The crash: the previous checkpoint loads, the interrupted save is cleaned up.
    assert out["crash_state"] == {"step": 1, "consumed_tokens": 4 * SEQ}
    assert out["crash_weights_sum"] == written["weights_sum"]
    assert out["crash_listing"] == ["iter_0000001", "latest"]
    assert f"removing {save_dir / killed_in}" in output

    # Same layout: every generator and the next step are exactly the uninterrupted run's.
    assert out["state"] == {"step": 2, "consumed_tokens": 2 * 4 * SEQ}
    assert out["draws_b"] == out["draws_a"]
    assert out["step3_b"] == out["step3_a"]
    assert out["step4_b"] == out["step4_a"]

    # A silent change of the run is refused, naming each field.
    assert out["refused_fields"] == ["model.num_layers", "schedule.train_steps"]

    # Finetuning: the weights (same loss and gradients on the same batch), a fresh schedule
    # (the LR warmup starts again from 0) and no run state.
    assert out["finetune_state"] is None
    assert out["finetune_lr"] == 0.0
    assert out["finetune_step3"] == out["step3_a"]

    # A corrupt file is named, with the advice of what else to load.
    assert "iter_0000002" in out["corrupt_error"] and ".distcp" in out["corrupt_error"]
    assert "truncated" in out["corrupt_error"]
    assert "No other complete checkpoint" in out["corrupt_error"]


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
    {"writer": _writer, "resume": _resume}[sys.argv[1]](Path(sys.argv[2]))
