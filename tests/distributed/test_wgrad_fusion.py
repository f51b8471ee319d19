"""Weight gradients accumulated in the GEMM (``model.wgrad_fusion``) train exactly like the DDP add.

Fresh gloo processes train three steps of a four-sequence batch in micro-batches of two (so
``main_grad`` accumulates across micro-batches, except with DP2) from the same weights and
batches, with the fusion off and on: on one rank (every transformer linear fuses), on one rank
with every layer compiled (``aot_eager``: the layer must stay one graph with the custom op
inside), with TP2 and sequence parallelism (the row-parallel linears fuse; the column-parallel
ones reduce their input gradient inside the matmul and keep megatron-core's path), and with DP2
and the distributed optimizer (the reduce-scatter after the backward reads the fused
``main_grad``), also with ``overlap_grad_reduce`` (each bucket's reduce-scatter starts from the
DDP hooks during the backward, so the fused weights' hooks must still run, once their
``main_grad`` holds the gradient). Losses, gradient norms and every ``main_grad`` after the first
step must agree to float tolerance, and a profile of each step after the first (which also
traces the compiled layers) must show the fused op as often as there are fused linears x
micro-batches (and never with the fusion off).
"""

from __future__ import annotations

import pytest
import torch

from megatron_ext.parallel.local_launch import run_on_local_processes
from tests.distributed.small_trainer import SmallTrainer

SEQ, MICRO_BATCH, GLOBAL_BATCH, VOCAB, LAYERS = 32, 2, 4, 512, 2
OP = "megatron_ext::accumulate_wgrad"


def worker(rank: int, phase: str) -> dict:
    from torch._dynamo.utils import counters

    from megatron_ext.models.config import ModelConfig, PrecisionConfig
    from megatron_ext.models.fast_path import compile_counts, compile_transformer_layers
    from megatron_ext.parallel.config import ParallelConfig
    from megatron_ext.parallel.init import destroy_parallel
    from megatron_ext.training.optimizer import OptimizerConfig
    from megatron_ext.training.schedule_config import ScheduleConfig

    torch.set_num_threads(1)
    fusion, compiled = phase.split("-")[0], "compiled" in phase
    tp = 2 if "tp2" in phase else 1  # the data-parallel size is what remains of the world
    parallel = ParallelConfig(
        device="cpu",
        tensor_model_parallel_size=tp,
        sequence_parallel=tp > 1,
        overlap_grad_reduce="overlap" in phase,
    )
    run = SmallTrainer(
        parallel,
        ModelConfig(num_layers=LAYERS, seq_length=SEQ, vocab_size=VOCAB, wgrad_fusion=fusion),
        PrecisionConfig(),
        OptimizerConfig(),
        ScheduleConfig(lr=1e-3, min_lr_ratio=0.1, lr_warmup_steps=1, train_steps=10),
        seed=1234,
    )
    if compiled:
        torch._dynamo.reset()
        counters.clear()
        compile_transformer_layers(run.model, backend="aot_eager")
    out: dict = {"losses": [], "norms": [], "op_calls": []}
    try:
        for step in range(1, 4):
            micro_batches = run.seeded_micro_batches(
                step, GLOBAL_BATCH, SEQ, VOCAB, MICRO_BATCH, low=1
            )
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                result = run.train_on(micro_batches, SEQ)
            out["losses"].append(result.loss)
            out["norms"].append(result.grad_norm)
            out["op_calls"].append(sum(e.count for e in prof.key_averages() if e.key == OP))
            if step == 1:
                out["main_grads"] = {
                    name: p.main_grad.detach().clone()
                    for name, p in run.model[0].module.named_parameters()
                }
        out.update(compile_counts())
    finally:
        destroy_parallel()
    return out


PHASES = {  # phase -> processes
    "off": 1,
    "on": 1,
    "on-compiled": 1,
    "off-tp2": 2,
    "on-tp2": 2,
    "off-dp2": 2,
    "on-dp2": 2,
    "on-dp2-overlap": 2,
}


@pytest.fixture(scope="module")
def runs():
    return {phase: run_on_local_processes(worker, n, phase) for phase, n in PHASES.items()}


@pytest.mark.timeout(600)
def test_the_fused_op_runs_once_per_fused_linear_and_micro_batch(runs):
    micro_batches = GLOBAL_BATCH // MICRO_BATCH
    for rank in runs["off"] + runs["off-tp2"] + runs["off-dp2"]:
        assert rank["op_calls"] == [0, 0, 0]
    # One rank: qkv, attention output, fc1 and fc2 of every layer.
    for phase in ("on", "on-compiled"):
        assert runs[phase][0]["op_calls"][1:] == [4 * LAYERS * micro_batches] * 2
    # TP2 + sequence parallelism: the two row-parallel linears of every layer.
    for rank in runs["on-tp2"]:
        assert rank["op_calls"][1:] == [2 * LAYERS * micro_batches] * 2
    # DP2: every linear, on each rank's one micro-batch.
    for rank in runs["on-dp2"] + runs["on-dp2-overlap"]:
        assert rank["op_calls"][1:] == [4 * LAYERS * micro_batches // 2] * 2


@pytest.mark.timeout(600)
def test_compiled_fused_layers_stay_one_graph(runs):
    compiled = runs["on-compiled"][0]
    assert compiled["graph_breaks"] == 0, compiled["graph_break_reasons"]
    assert compiled["compiled_graphs"] == 1


@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    "phase,reference",
    [
        ("on", "off"),
        ("on-compiled", "off"),
        ("on-tp2", "off-tp2"),
        ("on-dp2", "off-dp2"),
        ("on-dp2-overlap", "off-dp2"),
    ],
)
def test_fused_training_matches_the_ddp_add(runs, phase, reference):
    for ours, ref in zip(runs[phase], runs[reference], strict=True):
        assert ref["losses"][0] > 5.0  # about log(512): a real, untrained loss
        assert ours["losses"][0] == pytest.approx(ref["losses"][0], rel=1e-6)
        for step in range(3):
            assert ours["losses"][step] == pytest.approx(ref["losses"][step], rel=1e-5)
            assert ours["norms"][step] == pytest.approx(ref["norms"][step], rel=1e-5)
        assert ours["losses"][2] != ours["losses"][0]  # the updates moved the weights
        assert ours["main_grads"].keys() == ref["main_grads"].keys()
        for name, grad in ref["main_grads"].items():
            assert grad.abs().sum() > 0, f"{name}: no gradient reached it"
            torch.testing.assert_close(
                ours["main_grads"][name], grad, rtol=1e-5, atol=1e-7, msg=name
            )
