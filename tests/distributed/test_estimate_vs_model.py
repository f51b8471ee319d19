"""The dry run's parameter counts and memory estimate against the model megatron-core builds.

``training/estimate.py`` is what ``--dry-run`` prints and what the presets' "fits on an 80 GB
card" rests on. Here its numbers meet the real thing: this rank's model chunks, megatron-core DDP's
gradient buffers and the optimizer's state after one step, built by the training loop's own
``build_trainable`` on four gloo processes, in two layouts:

* ``tp2_pp2``: TP2 x PP2 (DP1), untied embeddings, bf16: per-stage parameters (embedding on the
  first stage, output layer and final norm on the last), the vocabulary padded for TP;
* ``tp2_dp2``: TP2 x DP2, tied embeddings, bf16, distributed optimizer: the fp32 main weights and
  Adam's moments sharded over the data-parallel ranks.

Activations are not compared: host memory accounting on the CPU does not measure them (the GPU
measurement in ``docs/performance.md`` does).
"""

from __future__ import annotations

import pytest
import torch

from megatron_ext.parallel.local_launch import run_on_local_processes
from tests.distributed.small_trainer import SmallTrainer

LAYOUTS = {"tp2_pp2": (2, 2, True), "tp2_dp2": (2, 1, False)}  # tp, pp, untied
SEQ, VOCAB = 32, 1000  # 1000 is padded to 1024 for TP2


def _configs(layout: str):
    from megatron_ext.models.config import ModelConfig, PrecisionConfig
    from megatron_ext.parallel.config import ParallelConfig

    tp, pp, untied = LAYOUTS[layout]
    return (
        # The default tiny shape: 4 layers, hidden 64, 4 heads in 2 query groups.
        ModelConfig(seq_length=SEQ, vocab_size=VOCAB, untie_embeddings_and_output_weights=untied),
        ParallelConfig(
            device="cpu", tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp
        ),
        PrecisionConfig(dtype="bf16"),
    )


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def worker(rank: int, layout: str) -> dict:
    from megatron.core import parallel_state

    from megatron_ext.checkpoint.manager import torch_adams
    from megatron_ext.models.builder import count_parameters
    from megatron_ext.parallel.init import destroy_parallel
    from megatron_ext.training.optimizer import OptimizerConfig
    from megatron_ext.training.schedule_config import ScheduleConfig

    torch.set_num_threads(1)
    model, parallel, precision = _configs(layout)
    run = SmallTrainer(
        parallel,
        model,
        precision,
        OptimizerConfig(),
        ScheduleConfig(lr=1e-3, min_lr_ratio=0.1, lr_warmup_steps=1, train_steps=4),
        seed=7,
    )
    try:
        batches = run.seeded_micro_batches(0, 2 * run.ctx.layout.dp, SEQ, VOCAB, 1)
        assert not run.train_on(batches, SEQ).skipped
        adams = torch_adams(run.optimizer)
        owned = [(adam, p) for adam in adams for g in adam.param_groups for p in g["params"]]
        main_weights = [p for _, p in owned]
        # Every main weight has both moments after the step (a missing one raises).
        moments = [adam.state[p][key] for adam, p in owned for key in ("exp_avg", "exp_avg_sq")]
        return {
            "stage": parallel_state.get_pipeline_model_parallel_rank(),
            "params": count_parameters(run.model),
            "weights": _nbytes(p for chunk in run.model for p in chunk.parameters()),
            "grads": _nbytes(buffer.grad_data for chunk in run.model for buffer in chunk.buffers),
            "optimizer": _nbytes(main_weights) + _nbytes(moments),
        }
    finally:
        destroy_parallel()


@pytest.fixture(scope="module")
def measured():
    return {layout: run_on_local_processes(worker, 4, layout) for layout in LAYOUTS}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_estimate_matches_the_built_model(measured, layout):
    from megatron_ext.training.estimate import GIB, estimate_stages, total_params

    model, parallel, precision = _configs(layout)
    tp, pp, untied = LAYOUTS[layout]
    estimates = estimate_stages(model, parallel, precision, 4, 1, SEQ)
    assert len(estimates) == pp
    ranks = measured[layout]
    for got in ranks:
        est = estimates[got["stage"]]
        assert got["params"] == est.params_per_gpu
        assert got["weights"] == pytest.approx(est.weights_gib * GIB, rel=1e-9)
        # DDP pads its buffers (to a multiple the data-parallel shards divide); nothing more.
        assert est.grads_gib * GIB <= got["grads"] <= est.grads_gib * GIB * 1.02
        assert got["optimizer"] == pytest.approx(est.optimizer_gib * GIB, rel=0.02)
    if layout == "tp2_pp2":  # DP1, untied: every parameter on exactly one (stage, TP rank)
        # The norms are replicated over TP: counted once in the whole model.
        replicated = model.num_layers * 2 * model.hidden_size + model.hidden_size
        whole = sum(got["params"] for got in ranks) - (tp - 1) * replicated
        assert whole == total_params(model, tp)
