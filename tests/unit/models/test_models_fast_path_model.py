"""The fast path trains exactly like the plain local path (TP2 with sequence parallelism, fp32).

Two spawned CPU processes form one tensor-parallel group (the vocabulary, and so the chunked
cross-entropy's reductions, are split across them). On each, the plain model and the fast-path
model (chunked cross-entropy, every layer under ``torch.compile`` with the ``aot_eager`` backend,
which traces the same graphs without generating C++ kernels) start from the same weights and run
two optimizer steps through megatron-core's DDP, distributed optimizer and schedules, then a
forward-only evaluation under ``no_grad``.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from megatron_ext.data.batches import split_micro_batches

SEQ, MICRO_BATCH, VOCAB = 32, 2, 500


def _micro_batches(step: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(100 + step)
    tokens = torch.randint(1, VOCAB, (2 * MICRO_BATCH, SEQ + 1), generator=gen)
    loss_mask = torch.ones(2 * MICRO_BATCH, SEQ)
    loss_mask[0, :5] = 0.0
    return split_micro_batches(tokens, MICRO_BATCH, loss_mask)


def _train(ctx, model_cfg, parallel, precision, state, compile_layers: bool) -> dict:
    from megatron_ext.models.builder import build_model
    from megatron_ext.models.fast_path import compile_transformer_layers
    from megatron_ext.training.optimizer import OptimizerConfig, prepare_for_training
    from megatron_ext.training.step import mean_loss, run_forward_backward, train_step

    chunks = build_model(model_cfg, parallel, precision, "cpu")
    if state is not None:
        chunks[0].load_state_dict(state)
    initial = {k: v.detach().clone() for k, v in chunks[0].state_dict().items() if "extra" not in k}
    if compile_layers:
        compile_transformer_layers(chunks, backend="aot_eager")
    ddp, optimizer = prepare_for_training(
        chunks, parallel, precision, OptimizerConfig(), peak_lr=1e-3, min_lr=1e-4
    )
    out = {"class": type(chunks[0]).__name__, "losses": [], "grad_norms": [], "state": initial}
    for step in range(2):
        result = train_step(
            ddp, optimizer, _micro_batches(step), SEQ, ctx.torch_device, ctx.pp_group(), True
        )
        out["losses"].append(result.loss)
        out["grad_norms"].append(result.grad_norm)
        if step == 0:
            out["main_grads"] = {
                name: param.main_grad.detach().clone()
                for name, param in ddp[0].module.named_parameters()
            }
    with torch.no_grad():  # evaluation, as the training loop runs it
        loss_dicts = run_forward_backward(
            ddp, _micro_batches(2), SEQ, ctx.torch_device, forward_only=True
        )
        out["eval_loss"] = mean_loss(loss_dicts, ctx.torch_device, ctx.pp_group(), True)
    return out


def worker(rank: int) -> dict:
    from megatron_ext.models.config import ModelConfig, PrecisionConfig
    from megatron_ext.parallel.config import ParallelConfig
    from megatron_ext.parallel.init import destroy_parallel, initialize_parallel

    torch.set_num_threads(1)
    parallel = ParallelConfig(device="cpu", tensor_model_parallel_size=2, sequence_parallel=True)
    precision = PrecisionConfig(dtype="fp32")
    model_cfg = ModelConfig(num_layers=2, seq_length=SEQ, vocab_size=VOCAB)
    ctx = initialize_parallel(parallel, seed=11)
    try:
        plain = _train(
            ctx, replace(model_cfg, fused_cross_entropy="off"), parallel, precision, None, False
        )
        fast = _train(
            ctx,
            replace(model_cfg, fused_cross_entropy="on"),
            parallel,
            precision,
            plain["state"],
            True,
        )
        compiled = _compiled_by_builder(
            replace(model_cfg, compile_layers="on"), parallel, precision
        )
    finally:
        destroy_parallel()
    return {"plain": plain, "fast": fast, "compiled_by_builder": compiled}


def _compiled_by_builder(model_cfg, parallel, precision) -> list[bool]:
    """compile_layers=on wraps every layer's forward in torch.compile (lazily: nothing runs)."""
    from megatron_ext.models.builder import build_model

    chunks = build_model(model_cfg, parallel, precision, "cpu")
    return [
        hasattr(layer.forward, "_torchdynamo_orig_callable") for layer in chunks[0].decoder.layers
    ]


@pytest.fixture(scope="module")
def runs():
    from megatron_ext.parallel.local_launch import run_on_local_processes

    return run_on_local_processes(worker, 2)


@pytest.mark.timeout(300)
def test_fast_path_uses_chunked_loss_model_and_compiled_layers(runs):
    for rank in runs:
        assert rank["plain"]["class"] == "GPTModel"
        assert rank["fast"]["class"] == "ChunkedLossGPTModel"
        assert rank["compiled_by_builder"] == [True, True]


@pytest.mark.timeout(300)
def test_fast_path_losses_and_grad_norms_match_plain(runs):
    for rank in runs:
        plain, fast = rank["plain"], rank["fast"]
        assert all(loss > 5.0 for loss in plain["losses"])  # about log(512): a real, untrained loss
        torch.testing.assert_close(fast["losses"], plain["losses"], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(fast["grad_norms"], plain["grad_norms"], rtol=1e-5, atol=1e-7)
        # The second step's loss depends on the first update: the updates agree too.
        assert plain["losses"][1] != plain["losses"][0]
        assert fast["eval_loss"] == pytest.approx(plain["eval_loss"], rel=1e-6)


@pytest.mark.timeout(300)
def test_fast_path_gradients_match_plain_per_parameter(runs):
    for rank in runs:
        plain, fast = rank["plain"]["main_grads"], rank["fast"]["main_grads"]
        assert plain.keys() == fast.keys() and len(plain) > 5
        for name in plain:
            assert plain[name].abs().sum() > 0, f"{name}: no gradient reached it"
            torch.testing.assert_close(fast[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)
