"""Checkpoints under ``parallel.overlap_param_gather`` (the recipe configs' setting).

With that switch the distributed optimizer leaves the all-gather of the updated weight shards to
the next forward pass, so right after an update each rank's model holds the other rank's shards
from the step before. Two gloo processes (DP2), bf16 with fp32 main weights, four steps from the
same weights and batches, in three fresh pairs of processes:

* ``plain``: no overlap, torch's fused AdamW and megatron-core's copy into the model;
* ``overlap``: overlapped gradient reduce-scatter and weight all-gather, with the AdamW update
  that writes the model's bf16 shard itself (``optimizer.fused_param_copy=on``); saves its step-2
  checkpoint and keeps the weights it holds right before and right after the save;
* ``resumed``: no overlap, resumed from ``overlap``'s checkpoint; keeps the weights it loaded,
  before any forward could gather anything.

Checks: ``overlap`` trains as ``plain`` does (the gathers the forward hooks start carry the shards
the update wrote); the weights were stale right before the save (so the check below is not
vacuous); the resumed model starts from exactly the up-to-date weights, and repeats ``overlap``'s
step 3 exactly.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_ext.parallel.local_launch import run_on_local_processes
from tests.distributed.small_trainer import SmallTrainer

SEQ, MICRO_BATCH, GLOBAL_BATCH, VOCAB = 32, 2, 8, 4096


def _trainer(phase: str) -> SmallTrainer:
    from megatron_ext.models.config import ModelConfig, PrecisionConfig
    from megatron_ext.parallel.config import ParallelConfig
    from megatron_ext.training.optimizer import OptimizerConfig
    from megatron_ext.training.schedule_config import ScheduleConfig

    overlap = phase == "overlap"
    return SmallTrainer(
        ParallelConfig(device="cpu", overlap_grad_reduce=overlap, overlap_param_gather=overlap),
        ModelConfig(vocab_size=VOCAB),
        PrecisionConfig(dtype="bf16"),
        OptimizerConfig(fused_param_copy="on" if overlap else "off"),
        ScheduleConfig(lr=1e-3, min_lr_ratio=0.1, lr_warmup_steps=2, train_steps=10),
        seed=1234,
    )


def _model_weights(run: SmallTrainer) -> dict[str, torch.Tensor]:
    return {
        name: param.detach().float().clone()
        for index, chunk in enumerate(run.model)
        for name, param in chunk.named_parameters(prefix=str(index))
    }


def worker(rank: int, phase: str, root: str) -> dict:
    from megatron_ext.parallel.init import destroy_parallel

    torch.set_num_threads(1)
    save_dir = Path(root) / "overlap"
    run = _trainer(phase)
    out: dict = {}
    step = 0
    try:
        if phase == "resumed":
            step = run.load_from(save_dir, {"seed": 1234})["step"]
            out["resumed_at"] = step
            out["loaded"] = _model_weights(run)
        while step < 4:
            step += 1
            batches = run.seeded_micro_batches(step, GLOBAL_BATCH, SEQ, VOCAB, MICRO_BATCH)
            result = run.train_on(batches, SEQ)
            assert not result.skipped
            out[f"loss_{step}"] = result.loss
            if phase == "overlap" and step == 2:
                out["before_save"] = _model_weights(run)
                run.save_to(save_dir, step, {}, {"seed": 1234})
                out["after_save"] = _model_weights(run)
    finally:
        destroy_parallel()
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("overlap_gather"))
    return {
        phase: run_on_local_processes(worker, 2, phase, root)
        for phase in ("plain", "overlap", "resumed")
    }


@pytest.mark.timeout(600)
def test_overlapped_gather_trains_as_the_plain_step(runs):
    for plain, overlap in zip(runs["plain"], runs["overlap"], strict=True):
        assert overlap["loss_1"] == plain["loss_1"]
        for step in range(2, 5):
            assert overlap[f"loss_{step}"] == pytest.approx(plain[f"loss_{step}"], rel=1e-5)
        assert overlap["loss_4"] != overlap["loss_1"]


@pytest.mark.timeout(600)
def test_checkpoint_holds_the_updated_weights(runs):
    for overlap, resumed in zip(runs["overlap"], runs["resumed"], strict=True):
        before, after = overlap["before_save"], overlap["after_save"]
        # Each rank's model held the other rank's shards of step 1 until the save gathered them.
        assert any(not torch.equal(before[name], after[name]) for name in before)
        assert resumed["resumed_at"] == 2
        for name, expected in after.items():
            assert torch.equal(resumed["loaded"][name], expected), name
        assert resumed["loss_3"] == overlap["loss_3"]
        assert resumed["loss_4"] == pytest.approx(overlap["loss_4"], rel=1e-5)
