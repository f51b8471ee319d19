"""A compiled local transformer layer is one graph on one rank, and computes what eager does.

One gloo process forms the world of a single-GPU run (global rank 0, where megatron-core's
``tp_group is None`` deprecation warning fires). Every layer of a two-layer model is compiled
with the ``aot_eager`` backend (Dynamo and AOTAutograd trace exactly as with Inductor, without
generating kernels), then runs forward and backward twice. Dynamo's counters must show no graph
break and a single graph for all layers. The same model built with megatron-core's stock
``RowParallelLinear`` must show the breaks (this is what the spec's ``LocalRowParallelLinear``
removes), and in eager mode our layer must not emit the warning at all. With activation
recomputation the compiled layers must still compute what eager ones do: ``full`` without a graph
break, ``selective`` breaking where megatron-core's checkpoint saves the RNG states.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from megatron_ext.parallel.local_launch import run_on_local_processes

SEQ, MICRO_BATCH, VOCAB = 32, 2, 512


def _loss_and_grads(chunk, tokens: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    chunk.zero_grad(set_to_none=True)
    positions = torch.arange(SEQ).expand(MICRO_BATCH, SEQ)
    loss = chunk(tokens[:, :-1], positions, None, labels=tokens[:, 1:]).float().mean()
    loss.backward()
    grads = {name: p.grad.detach().float().clone() for name, p in chunk.named_parameters()}
    return float(loss), grads


def _run(dtype: str, stock_row_linear: bool, recompute: str = "none") -> dict:
    from torch._dynamo.utils import counters

    from megatron_ext.models import specs
    from megatron_ext.models.builder import build_model
    from megatron_ext.models.config import ModelConfig, PrecisionConfig
    from megatron_ext.models.fast_path import compile_counts, compile_transformer_layers
    from megatron_ext.parallel.config import ParallelConfig

    if stock_row_linear:  # megatron-core's own class in the same slots
        from megatron.core.tensor_parallel.layers import RowParallelLinear

        specs.LocalRowParallelLinear = RowParallelLinear
    parallel = ParallelConfig(device="cpu")
    model_cfg = ModelConfig(
        num_layers=2, seq_length=SEQ, vocab_size=VOCAB, recompute_granularity=recompute
    )
    torch.manual_seed(5)
    chunk = build_model(model_cfg, parallel, PrecisionConfig(dtype=dtype), "cpu")[0]
    tokens = torch.randint(
        1, VOCAB, (MICRO_BATCH, SEQ + 1), generator=torch.Generator().manual_seed(3)
    )

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        eager = _loss_and_grads(chunk, tokens)
    tp_group_warnings = sum("tp_group is None" in str(w.message) for w in caught)

    torch._dynamo.reset()
    counters.clear()
    compile_transformer_layers([chunk], backend="aot_eager")
    compiled = [_loss_and_grads(chunk, tokens) for _ in range(2)]
    return {
        **compile_counts(),
        "tp_group_warnings": tp_group_warnings,
        "eager": eager,
        "compiled": compiled,
    }


def worker(rank: int, stock_row_linear: bool) -> dict:
    from megatron_ext.parallel.config import ParallelConfig
    from megatron_ext.parallel.init import destroy_parallel, initialize_parallel

    torch.set_num_threads(1)
    initialize_parallel(ParallelConfig(device="cpu"), seed=7)
    try:
        if stock_row_linear:
            return {"fp32": _run("fp32", True)}
        runs = {dtype: _run(dtype, False) for dtype in ("fp32", "bf16")}
        for recompute in ("full", "selective"):
            runs[recompute] = _run("fp32", False, recompute)
        return runs
    finally:
        destroy_parallel()


@pytest.fixture(scope="module")
def ours():
    return run_on_local_processes(worker, 1, False)[0]


@pytest.fixture(scope="module")
def stock():
    return run_on_local_processes(worker, 1, True)[0]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_compiled_layers_have_no_graph_break_and_share_one_graph(ours, dtype):
    run = ours[dtype]
    assert run["graph_breaks"] == 0, run["graph_break_reasons"]
    assert run["compiled_graphs"] == 1


@pytest.mark.timeout(300)
def test_megatron_core_row_parallel_linear_splits_the_compiled_layer(stock):
    run = stock["fp32"]
    assert run["tp_group_warnings"] > 0
    assert run["graph_breaks"] > 0
    assert run["compiled_graphs"] > 1
    reasons = run["graph_break_reasons"]
    assert any("skipped" in reason for reason in reasons), reasons


@pytest.mark.timeout(300)
def test_bound_group_layer_warns_nothing_in_eager_mode(ours):
    assert ours["fp32"]["tp_group_warnings"] == 0


@pytest.mark.timeout(300)
@pytest.mark.parametrize("run", ["fp32", "full", "selective"])
def test_compiled_layers_compute_what_eager_layers_compute(ours, run):
    eager_loss, eager_grads = ours[run]["eager"]
    assert eager_loss > 5.0  # about log(512): an untrained model's real loss
    for loss, grads in ours[run]["compiled"]:
        assert loss == pytest.approx(eager_loss, rel=1e-6)
        assert grads.keys() == eager_grads.keys()
        for name, grad in grads.items():
            assert eager_grads[name].abs().sum() > 0, f"{name}: no gradient reached it"
            torch.testing.assert_close(grad, eager_grads[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.timeout(300)
def test_recomputation_keeps_full_layers_whole_and_breaks_selective_at_the_rng_state(ours):
    assert ours["full"]["graph_breaks"] == 0, ours["full"]["graph_break_reasons"]
    # Dynamo compiles the layer once without and once with autograd (the recomputation).
    assert ours["full"]["compiled_graphs"] == 2
    assert ours["selective"]["graph_breaks"] > 0
