"""torch's fused AdamW in megatron-core's distributed optimizer, and resuming across kernels.

Two gloo processes (DP2, the optimizer state sharded over them) run three phases, each a fresh
pair of processes:

1. torch's default update (``optimizer.fused_adamw=false``: the ``fused``/``foreach`` switches
   left unset, i.e. foreach on GPU, the per-tensor loop on CPU): steps 1-2, save step 2, steps 3-4;
2. the fused update (the default): steps 1-4 from the same initial weights and batches;
3. the fused update resumed from phase 1's checkpoint (saved with the default update): steps 3-4.

Checks: both kernels compute the same update (losses to float tolerance); a resume keeps the
configured kernel rather than the saving run's; the first step after resuming repeats phase 1's
step 3 exactly (its loss depends only on the restored weights) and the next one, which uses the
restored moments and Adam step, matches it to float tolerance.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_ext.parallel.local_launch import run_on_local_processes
from tests.distributed.small_trainer import SmallTrainer

SEQ, MICRO_BATCH, GLOBAL_BATCH, VOCAB = 32, 2, 8, 4096


class _Run(SmallTrainer):
    def __init__(self, fused: bool):
        from megatron_ext.models.config import ModelConfig, PrecisionConfig
        from megatron_ext.parallel.config import ParallelConfig
        from megatron_ext.training.optimizer import OptimizerConfig
        from megatron_ext.training.schedule_config import ScheduleConfig

        super().__init__(
            ParallelConfig(device="cpu"),
            ModelConfig(vocab_size=VOCAB),
            PrecisionConfig(),
            OptimizerConfig(fused_adamw=fused),
            ScheduleConfig(lr=1e-3, min_lr_ratio=0.1, lr_warmup_steps=2, train_steps=10),
            seed=1234,
        )
        self.step = 0

    def kernels(self) -> list[tuple]:
        from megatron_ext.checkpoint.manager import torch_adams

        return [
            (g["fused"], g["foreach"]) for a in torch_adams(self.optimizer) for g in a.param_groups
        ]

    def train(self) -> float:
        from megatron_ext.data.batches import split_micro_batches

        self.step += 1
        tokens = torch.randint(
            0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=torch.Generator().manual_seed(self.step)
        )
        share = GLOBAL_BATCH // self.ctx.layout.dp
        mine = tokens[self.ctx.dp_rank * share : (self.ctx.dp_rank + 1) * share]
        return self.train_on(split_micro_batches(mine, MICRO_BATCH), SEQ).loss

    def checkpoint(self, save_dir: Path, load: bool) -> None:
        config = {"seed": 1234}
        if load:
            self.step = self.load_from(save_dir, config)["step"]
        else:
            self.save_to(save_dir, self.step, {}, config)


def worker(rank: int, phase: str, root: str) -> dict:
    """One phase on this rank: ``foreach``, ``fused`` or ``resumed`` (see the module docstring)."""
    from megatron_ext.parallel.init import destroy_parallel

    torch.set_num_threads(1)
    save_dir = Path(root) / "foreach"
    run = _Run(fused=phase != "foreach")
    out: dict = {}
    try:
        if phase == "resumed":
            run.checkpoint(save_dir, load=True)
            out["resumed_at"] = run.step
        out["kernels"] = run.kernels()
        while run.step < 4:
            loss = run.train()
            out[f"loss_{run.step}"] = loss
            if phase == "foreach" and run.step == 2:
                run.checkpoint(save_dir, load=False)
    finally:
        destroy_parallel()
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Per phase, the results of rank 0 and rank 1 (each phase a fresh pair of processes)."""
    root = str(tmp_path_factory.mktemp("kernels"))
    return {
        phase: run_on_local_processes(worker, 2, phase, root)
        for phase in ("foreach", "fused", "resumed")
    }


@pytest.mark.timeout(600)
def test_fused_adamw_is_the_default_and_matches_foreach(runs):
    for foreach, fused in zip(runs["foreach"], runs["fused"], strict=True):
        assert foreach["kernels"] and all(k == (None, None) for k in foreach["kernels"])
        assert fused["kernels"] and all(k == (True, False) for k in fused["kernels"])
        assert fused["loss_1"] == foreach["loss_1"]
        for step in (2, 3, 4):
            assert fused[f"loss_{step}"] == pytest.approx(foreach[f"loss_{step}"], rel=1e-5)
        # The updates really ran: the loss moved.
        assert fused["loss_4"] != fused["loss_1"]


@pytest.mark.timeout(600)
def test_resume_keeps_the_configured_kernel(runs):
    for foreach, resumed in zip(runs["foreach"], runs["resumed"], strict=True):
        assert resumed["resumed_at"] == 2
        assert resumed["kernels"] and all(k == (True, False) for k in resumed["kernels"])
        assert resumed["loss_3"] == foreach["loss_3"]
        assert resumed["loss_4"] == pytest.approx(foreach["loss_4"], rel=1e-5)
