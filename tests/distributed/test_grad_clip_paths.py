"""The gradient norm and clip without TE/apex: megatron-core's local fallbacks against ours.

Two gloo processes (TP2: the norm is summed over the tensor-parallel group and the norm weights,
duplicated on both ranks, counted once) train four steps from the same weights and batches with a
clip that always engages (``clip_grad=0.05``), in three fresh pairs of processes:

* ``reference``: megatron-core's local ``multi_tensor_l2norm`` / ``multi_tensor_scale`` fallbacks
  (``multi_tensor.restore()``) and the clip applied to the gradients before torch's fused AdamW
  update (``train_step(..., clip_in_update=False)``);
* ``default``: the ``_foreach`` norm and scale (``training.multi_tensor``) and the clip folded into
  the fused update as its ``grad_scale``;
* ``foreach_update``: the ``_foreach`` norm and scale with torch's default (non-fused) update,
  which takes no ``grad_scale``: the clip is the in-place ``_foreach_mul_``.

All three must agree: the same first loss; to float tolerance the gradient norms, the norm of the
clipped gradients left behind (``clip_grad``), Adam's first moments and the losses after the
clipped updates. A step pre-hook on each torch optimizer records whether its update was given a
``grad_scale``.
"""

from __future__ import annotations

import pytest
import torch

from megatron_ext.parallel.local_launch import run_on_local_processes
from tests.distributed.small_trainer import SmallTrainer

SEQ, MICRO_BATCH, GLOBAL_BATCH, VOCAB, CLIP = 32, 2, 4, 4096, 0.05


def _trainer(fused: bool) -> SmallTrainer:
    from megatron_ext.models.config import ModelConfig, PrecisionConfig
    from megatron_ext.parallel.config import ParallelConfig
    from megatron_ext.training.optimizer import OptimizerConfig
    from megatron_ext.training.schedule_config import ScheduleConfig

    return SmallTrainer(
        ParallelConfig(device="cpu", tensor_model_parallel_size=2),
        ModelConfig(vocab_size=VOCAB),
        PrecisionConfig(),
        OptimizerConfig(fused_adamw=fused, clip_grad=CLIP),
        ScheduleConfig(lr=1e-3, min_lr_ratio=0.1, lr_warmup_steps=2, train_steps=10),
        seed=1234,
    )


def _moment_norm(adams) -> float:
    squares = [
        adam.state[param]["exp_avg"].double().norm() ** 2
        for adam in adams
        for group in adam.param_groups
        for param in group["params"]
    ]
    return float(torch.stack(squares).sum().sqrt())


def worker(rank: int, phase: str) -> dict:
    from megatron.core.optimizer import clip_grads

    from megatron_ext.checkpoint.manager import torch_adams
    from megatron_ext.parallel.init import destroy_parallel
    from megatron_ext.training import multi_tensor
    from megatron_ext.training.step import fuses_grad_scale

    torch.set_num_threads(1)
    run = _trainer(fused=phase != "foreach_update")
    reference = phase == "reference"
    if reference:  # what megatron-core binds without TE/apex
        multi_tensor.restore()
    adams = torch_adams(run.optimizer)
    out: dict = {
        "ours": clip_grads.l2_norm_impl is multi_tensor.foreach_l2_norm,
        "fused": [fuses_grad_scale(adam) for adam in adams],
        "update_had_grad_scale": [],
    }
    for adam in adams:  # what each update was given, seen from inside torch's step
        adam.register_step_pre_hook(
            lambda opt, args, kwargs: out["update_had_grad_scale"].append(
                hasattr(opt, "grad_scale")
            )
        )
    try:
        for step in range(1, 5):
            micro_batches = run.seeded_micro_batches(step, GLOBAL_BATCH, SEQ, VOCAB, MICRO_BATCH)
            result = run.train_on(micro_batches, SEQ, clip_in_update=not reference)
            out[f"loss_{step}"] = result.loss
            out[f"norm_{step}"] = result.grad_norm
            assert not result.skipped
            # Adam's update hardly depends on the gradients' scale; its moments and the clipped
            # gradients left behind do.
            out[f"clipped_norm_{step}"] = float(run.optimizer.get_grad_norm())
            out[f"exp_avg_norm_{step}"] = _moment_norm(adams)
        out["grad_scale_left"] = any(hasattr(adam, "grad_scale") for adam in adams)
    finally:
        destroy_parallel()
    return out


@pytest.fixture(scope="module")
def runs():
    return {
        phase: run_on_local_processes(worker, 2, phase)
        for phase in ("reference", "default", "foreach_update")
    }


@pytest.mark.timeout(600)
def test_each_phase_took_its_path(runs):
    for rank in range(2):
        reference, default, foreach = (
            runs[p][rank] for p in ("reference", "default", "foreach_update")
        )
        assert not reference["ours"] and default["ours"] and foreach["ours"]
        assert all(reference["fused"] + default["fused"]) and not any(foreach["fused"])
        assert len(default["update_had_grad_scale"]) == 4 and all(default["update_had_grad_scale"])
        assert len(reference["update_had_grad_scale"]) == 4
        assert not any(reference["update_had_grad_scale"] + foreach["update_had_grad_scale"])
        assert not default["grad_scale_left"]
        for run in (reference, default, foreach):
            for step in range(1, 5):
                # The clip engaged at every step, and left gradients of norm CLIP behind.
                assert run[f"norm_{step}"] > 10 * CLIP
                assert run[f"clipped_norm_{step}"] == pytest.approx(CLIP, rel=1e-5)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("phase", ["default", "foreach_update"])
def test_same_norms_and_updates_as_megatron_fallbacks(runs, phase):
    for reference, ours in zip(runs["reference"], runs[phase], strict=True):
        assert ours["loss_1"] == reference["loss_1"]
        for step in range(1, 5):
            assert ours[f"norm_{step}"] == pytest.approx(reference[f"norm_{step}"], rel=1e-6)
            assert ours[f"loss_{step}"] == pytest.approx(reference[f"loss_{step}"], rel=1e-6)
            for key in (f"clipped_norm_{step}", f"exp_avg_norm_{step}"):
                assert ours[key] == pytest.approx(reference[key], rel=1e-6)
        assert ours["loss_4"] != ours["loss_1"]  # the updates moved the weights
