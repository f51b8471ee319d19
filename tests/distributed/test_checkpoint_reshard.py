"""Resharding on resume: TP2xPP2xDP2 -> TP1xPP1xDP4 and back, over gloo on CPU.

One spawn of 8 processes runs three phases, each a fresh process group and megatron-core state:

1. TP2xPP2xDP2 (8 ranks): train steps 1-2, save step 2 into ``A``, train steps 3-4.
2. TP1xPP1xDP4 (ranks 0-3): build a differently initialised model, resume from ``A``, save the
   loaded state again as ``A_resaved``, train step 3, save step 3 into ``B``, train steps 4-5.
3. TP2xPP2xDP2 (8 ranks): resume from ``B``, save it again as ``B_resaved``, train steps 4-5.

The checks: the re-saved checkpoints hold exactly the tensors (model and optimizer state, at full
shape, as dist_checkpointing gathers them) of the checkpoint that was loaded; the first two losses
after resuming (the second one depends on the optimizer state) equal the losses the other layout
computes at those steps; the token position and the LR continue.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from megatron_ext.data.batches import split_micro_batches
from megatron_ext.training.schedule_config import ScheduleConfig
from tests.distributed.small_trainer import SmallTrainer

# Warmup over 2 steps to 1e-3, then cosine to 1e-4 at step 10, built as the training loop builds it.
SCHEDULE = ScheduleConfig(lr=1e-3, min_lr_ratio=0.1, lr_warmup_steps=2, train_steps=10)
GLOBAL_BATCH, MICRO_BATCH, SEQ, VOCAB = 8, 1, 32, 4000
PHASES = [  # (tp, pp, ranks taking part, model seed)
    (2, 2, 8, 1234),
    (1, 1, 4, 99),
    (2, 2, 8, 7),
]


def _micro_batches(step: int, dp_rank: int, dp: int) -> list[dict[str, torch.Tensor]]:
    """The same global batch for a step whatever the layout; this DP rank's share of it."""
    gen = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=gen)
    per_rank = GLOBAL_BATCH // dp
    mine = tokens[dp_rank * per_rank : (dp_rank + 1) * per_rank]
    return split_micro_batches(mine, MICRO_BATCH)


class _Trainer(SmallTrainer):
    """One phase's trainer, with the step and token position a checkpoint carries."""

    def __init__(self, tp: int, pp: int, seed: int):
        from megatron_ext.models.config import ModelConfig, PrecisionConfig
        from megatron_ext.parallel.config import ParallelConfig
        from megatron_ext.training.optimizer import OptimizerConfig

        parallel = ParallelConfig(
            device="cpu", tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp
        )
        super().__init__(
            parallel, ModelConfig(), PrecisionConfig(), OptimizerConfig(), SCHEDULE, seed
        )
        self.step = 0
        self.consumed_tokens = 0
        self.config = {"seed": 1234, "model": {"hidden_size": 64}, "parallel": {"tp": tp, "pp": pp}}

    def train(self, results: dict) -> None:
        ctx = self.ctx
        result = self.train_on(_micro_batches(self.step + 1, ctx.dp_rank, ctx.layout.dp), SEQ)
        self.step += 1
        self.consumed_tokens += GLOBAL_BATCH * SEQ
        results[f"loss_{self.step}"] = result.loss
        results[f"grad_norm_{self.step}"] = result.grad_norm
        results[f"lr_after_{self.step}"] = self.optimizer.param_groups[0]["lr"]

    def save(self, save_dir: Path) -> None:
        self.save_to(save_dir, self.step, {"consumed_tokens": self.consumed_tokens}, self.config)

    def load(self, save_dir: Path, results: dict) -> None:
        state = self.load_from(save_dir, self.config)
        self.step, self.consumed_tokens = state["step"], state["consumed_tokens"]
        results["resumed_step"] = self.step
        results["resumed_tokens"] = self.consumed_tokens
        results["resumed_lr"] = self.optimizer.param_groups[0]["lr"]


def _preemption_agreed(ctx, signal_rank: int | None) -> bool:
    """Whether every rank stops when only ``signal_rank`` received SIGUSR1."""
    import signal

    from megatron_ext.checkpoint.preemption import PreemptionHandler

    with PreemptionHandler() as handler:
        if ctx.rank == signal_rank:
            os.kill(os.getpid(), signal.SIGUSR1)
        return handler.should_stop(ctx)


def _phase(index: int, rank: int, port: int, root: Path) -> None:
    from megatron_ext.parallel.init import destroy_parallel

    tp, pp, world, seed = PHASES[index]
    os.environ.update(
        {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
    )
    trainer = _Trainer(tp, pp, seed)
    results: dict = {}
    try:
        if index == 0:
            trainer.train(results)
            results["stop_before_signal"] = _preemption_agreed(trainer.ctx, signal_rank=None)
            results["stop_after_signal"] = _preemption_agreed(trainer.ctx, signal_rank=5)
            trainer.train(results)
            trainer.save(root / "A")
            trainer.train(results)
            trainer.save(root / "A3")
            trainer.train(results)
        elif index == 1:
            trainer.load(root / "A", results)
            trainer.save(root / "A_resaved")
            trainer.train(results)
            trainer.save(root / "B")
            trainer.train(results)
            trainer.train(results)
        else:
            trainer.load(root / "B", results)
            trainer.save(root / "B_resaved")
            trainer.train(results)
            trainer.train(results)
        if trainer.ctx.is_logging_rank:
            (root / f"phase{index}.json").write_text(json.dumps(results))
    finally:
        destroy_parallel()


def worker(rank: int, ports: list[int], root: str) -> None:
    """One process of the spawn: every phase it takes part in, in order."""
    import logging

    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    for index, (_, _, world, _) in enumerate(PHASES):
        if rank < world:
            _phase(index, rank, ports[index], Path(root))


def _full_tensors(checkpoint: Path, tmp: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a torch_dist checkpoint at full shape, read without a process group."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = tmp / f"{checkpoint.parent.name}_{checkpoint.name}.pt"
    dcp_to_torch_save(str(checkpoint), str(out))
    state = torch.load(out, weights_only=False)
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


@pytest.fixture(scope="module")
def resharded_runs(tmp_path_factory):
    import torch.multiprocessing as mp

    from megatron_ext.parallel.ports import find_free_ports

    root = tmp_path_factory.mktemp("reshard")
    ports = find_free_ports(len(PHASES))
    mp.spawn(worker, args=(ports, str(root)), nprocs=8, join=True)
    results = [json.loads((root / f"phase{i}.json").read_text()) for i in range(len(PHASES))]
    return root, results


@pytest.mark.timeout(600)
def test_checkpoint_tp2pp2dp2_to_tp1pp1dp4(resharded_runs, tmp_path):
    root, (a, b, _) = resharded_runs
    # Preemption: a signal on one rank stops all of them at the same step.
    assert a["stop_before_signal"] is False and a["stop_after_signal"] is True
    assert b["resumed_step"] == 2
    assert b["resumed_tokens"] == 2 * GLOBAL_BATCH * SEQ
    assert b["resumed_lr"] == a["lr_after_2"]
    saved = _full_tensors(root / "A" / "iter_0000002", tmp_path)
    resaved = _full_tensors(root / "A_resaved" / "iter_0000002", tmp_path)
    assert saved.keys() == resaved.keys()
    assert any(k.startswith("optimizer.state.exp_avg_sq.") for k in saved)
    for key in saved:
        assert torch.equal(saved[key], resaved[key]), key
    # The first step after resuming: the same loss and gradient norm as the original layout.
    assert b["loss_3"] == pytest.approx(a["loss_3"], rel=1e-5)
    assert b["grad_norm_3"] == pytest.approx(a["grad_norm_3"], rel=1e-4)
    # The update of that step used the resharded optimizer state (moments, Adam step): the
    # weights and moments after it match the original layout's.
    assert b["loss_4"] == pytest.approx(a["loss_4"], rel=1e-5)
    original = _full_tensors(root / "A3" / "iter_0000003", tmp_path)
    resumed = _full_tensors(root / "B" / "iter_0000003", tmp_path)
    assert original.keys() == resumed.keys()
    # Reduction order differs between layouts: ~1e-8 in general, ~1e-5 in embedding rows of
    # rare tokens (tiny gradients, which Adam normalises). A wrong moment or Adam step moves
    # every weight by about the learning rate (1e-3).
    for key in original:
        worst = (original[key] - resumed[key]).abs().max().item()
        assert worst < (1e-4 if "word_embeddings" in key else 1e-6), (key, worst)


@pytest.mark.timeout(600)
def test_checkpoint_tp1pp1dp4_to_tp2pp2dp2(resharded_runs, tmp_path):
    root, (_, b, c) = resharded_runs
    assert c["resumed_step"] == 3
    assert c["resumed_tokens"] == 3 * GLOBAL_BATCH * SEQ
    assert c["resumed_lr"] == b["lr_after_3"]
    saved = _full_tensors(root / "B" / "iter_0000003", tmp_path)
    resaved = _full_tensors(root / "B_resaved" / "iter_0000003", tmp_path)
    assert saved.keys() == resaved.keys()
    for key in saved:
        assert torch.equal(saved[key], resaved[key]), key
    assert c["loss_4"] == pytest.approx(b["loss_4"], rel=1e-5)
    assert c["grad_norm_4"] == pytest.approx(b["grad_norm_4"], rel=1e-4)
    assert c["loss_5"] == pytest.approx(b["loss_5"], rel=1e-5)
