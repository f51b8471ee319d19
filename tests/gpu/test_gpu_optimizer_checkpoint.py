"""Fused AdamW and background checkpoint saves on a CUDA GPU (one process).

Run by ``tests/gpu/run_gpu_checks.sh``; skipped without CUDA. What only a GPU exercises: the fused
kernel keeps Adam's ``step`` on the device (and a resume must put it there); a background save
stages the GPU tensors to host memory when it is scheduled, while the next step already changes
them on the device; megatron-core's own writer-results queue (not the CPU file queue) is used.

One run in bf16: steps 1-2, a synchronous save and a background save of step 2, step 3 while
the background writer may still write, publish. A second model (other initial weights) resumes
from the background checkpoint and repeats step 3. Checks: both checkpoints hold the same tensors;
the resumed optimizer runs the fused kernel with ``step`` on the GPU, one tensor per parameter;
the repeated step 3 gives the first run's loss.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_ext.data.batches import split_micro_batches
from tests.distributed.small_trainer import SmallTrainer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

SEQ, MICRO_BATCH, VOCAB = 256, 2, 8192


class _Run(SmallTrainer):
    def __init__(self, device: str, seed: int):
        from megatron_ext.models.config import ModelConfig, PrecisionConfig
        from megatron_ext.parallel.config import ParallelConfig
        from megatron_ext.training.optimizer import OptimizerConfig
        from megatron_ext.training.schedule_config import ScheduleConfig

        model_cfg = ModelConfig(
            hidden_size=256,
            ffn_hidden_size=704,
            num_attention_heads=4,
            seq_length=SEQ,
            vocab_size=VOCAB,
            compile_layers="off",
            fused_cross_entropy="off",
        )
        super().__init__(
            ParallelConfig(device=device),
            model_cfg,
            PrecisionConfig(dtype="bf16" if device == "cuda" else "fp32"),
            OptimizerConfig(),
            ScheduleConfig(lr=1e-3, min_lr_ratio=0.1, lr_warmup_steps=2, train_steps=10),
            seed=seed,
        )
        self.step = 0

    def train(self) -> float:
        self.step += 1
        gen = torch.Generator().manual_seed(self.step)
        tokens = torch.randint(0, VOCAB, (2 * MICRO_BATCH, SEQ + 1), generator=gen)
        return self.train_on(split_micro_batches(tokens, MICRO_BATCH), SEQ).loss

    def save(self, save_dir: Path, background=None) -> None:
        self.save_to(save_dir, self.step, {}, {"seed": 1}, background)

    def load(self, save_dir: Path) -> None:
        self.step = self.load_from(save_dir, {"seed": 1})["step"]


def _full_tensors(checkpoint: Path, out: Path) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(str(checkpoint), str(out))
    state = torch.load(out, weights_only=False)
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def scenario(device: str, root: Path) -> dict:
    """The whole check on ``device``; returns what the test asserts on."""
    from megatron_ext.checkpoint.background import BackgroundSaves
    from megatron_ext.checkpoint.manager import torch_adams
    from megatron_ext.parallel.init import destroy_parallel

    out: dict = {}
    run = _Run(device, seed=1)
    try:
        run.train()
        run.train()
        run.save(root / "sync")
        background = BackgroundSaves()
        run.save(root / "async", background)
        out["loss_3"] = run.train()
        out["published"] = background.wait()
    finally:
        destroy_parallel()
    run = _Run(device, seed=2)
    try:
        run.load(root / "async")
        adams = torch_adams(run.optimizer)
        params = [p for a in adams for g in a.param_groups for p in g["params"]]
        steps = [a.state[p]["step"] for a in adams for g in a.param_groups for p in g["params"]]
        out["fused"] = [g["fused"] for a in adams for g in a.param_groups]
        out["step_devices_match"] = all(s.device == p.device for s, p in zip(steps, params))
        out["distinct_steps"] = len({id(s) for s in steps}) == len(steps)
        out["resumed_loss_3"] = run.train()
    finally:
        destroy_parallel()
    sync = _full_tensors(root / "sync" / "iter_0000002", root / "sync.pt")
    written = _full_tensors(root / "async" / "iter_0000002", root / "async.pt")
    out["same_keys"] = sync.keys() == written.keys()
    out["different"] = [k for k in sync if not torch.equal(sync[k], written.get(k, sync[k] + 1))]
    return out


@pytest.mark.timeout(300)
def test_fused_adamw_and_background_save_on_cuda(tmp_path):
    out = scenario("cuda", tmp_path)
    assert out["published"] == [2]
    assert out["same_keys"] and out["different"] == []
    assert out["fused"] and all(out["fused"])
    assert out["step_devices_match"] and out["distinct_steps"]
    assert out["resumed_loss_3"] == pytest.approx(out["loss_3"], rel=1e-6)
