"""The fast path on a CUDA GPU: compiled chunked cross-entropy and compiled layers match plain.

Run by ``tests/gpu/run_gpu_checks.sh``; skipped without CUDA. Checks, on the GPU's real kernels
(Inductor-generated Triton, SDPA flash attention, bf16 GEMMs):

* the chunked cross-entropy at the recipe's 65,536 vocabulary against ``F.cross_entropy`` of the
  fp32 logits (loss, gradient) and that it allocates less than one fp32 copy of the logits; with
  ``overwrite_logits`` its backward writes the same gradient into the logits' memory;
* a small megatron_ext model trained three steps with the fast path (Inductor-compiled layers,
  chunked loss) against the plain local path from the same weights, in fp32 (tight) and bf16,
  and with no ``torch.compile`` graph break on the way (each layer one graph).
* ``model.wgrad_fusion``: the weight-gradient accumulation into an fp32 ``main_grad`` on cuBLAS
  against float64, and the fused fast path trained like the unfused one, without a graph break;
* a training step's first host wait is the gradient norm's read, not the loss's.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from megatron_ext.data.batches import split_micro_batches

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

SEQ, MICRO_BATCH, VOCAB = 256, 2, 8192


def test_chunked_cross_entropy_matches_fp32_reference_at_65536_vocab():
    from megatron_ext.models.fused_loss import chunked_cross_entropy

    gen = torch.Generator(device="cuda").manual_seed(0)
    rows, vocab = 4096 + 37, 65536  # not a multiple of the 1,024-row chunk
    logits = (2.0 * torch.randn(rows, vocab, device="cuda", generator=gen)).to(torch.bfloat16)
    target = torch.randint(0, vocab, (rows,), device="cuda", generator=gen)
    weights = torch.rand(rows, device="cuda", generator=gen) / rows

    ref_x = logits.clone().requires_grad_(True)
    ref_loss = F.cross_entropy(ref_x.float(), target, reduction="none")
    (ref_loss * weights).sum().backward()

    ref_loss, ref_grad = ref_loss.detach(), ref_x.grad  # keep only the reference's results
    del ref_x

    x = logits.clone().requires_grad_(True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    loss = chunked_cross_entropy(x, target)
    torch.cuda.synchronize()
    forward_extra = torch.cuda.max_memory_allocated() - before
    (loss * weights).sum().backward()
    torch.cuda.synchronize()
    total_extra = torch.cuda.max_memory_allocated() - before

    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(x.grad.float(), ref_grad.float(), rtol=2e-2, atol=1e-7)
    fp32_copy = rows * vocab * 4
    # Forward: per-row statistics and at most one chunk's temporaries (the gradient is made in
    # the backward); the plain path keeps an fp32 copy and an fp32 softmax at this point.
    assert forward_extra < 0.3 * fp32_copy, f"forward: {forward_extra / 2**30:.2f} GiB extra"
    # With the backward: the bf16 gradient (half an fp32 copy; x's logits must survive here).
    assert total_extra < 0.8 * fp32_copy, f"forward+backward: {total_extra / 2**30:.2f} GiB extra"


def test_chunked_cross_entropy_writes_the_gradient_over_the_logits_in_place():
    from megatron_ext.models.fused_loss import chunked_cross_entropy

    gen = torch.Generator(device="cuda").manual_seed(1)
    rows, vocab = 4096 + 37, 65536
    logits = (2.0 * torch.randn(rows, vocab, device="cuda", generator=gen)).to(torch.bfloat16)
    target = torch.randint(0, vocab, (rows,), device="cuda", generator=gen)
    weights = torch.rand(rows, device="cuda", generator=gen) / rows

    ref_x = logits.clone().requires_grad_(True)
    (chunked_cross_entropy(ref_x, target) * weights).sum().backward()
    ref_grad = ref_x.grad
    del ref_x

    x = logits.clone().requires_grad_(True)
    y = x.clone()  # a model's intermediate logits
    at_hook = {}

    def record(grad: torch.Tensor) -> None:  # runs when the loss's backward has made y's gradient
        at_hook["ptr"] = grad.data_ptr()
        at_hook["peak"] = torch.cuda.max_memory_allocated()

    y.register_hook(record)
    loss = chunked_cross_entropy(y, target, overwrite_logits=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    (loss * weights).sum().backward()

    assert at_hook["ptr"] == y.data_ptr()
    torch.testing.assert_close(x.grad, ref_grad, rtol=0, atol=0)
    # The compiled kernel stores into the logits: no second [rows, V] tensor (half an fp32 copy).
    loss_backward_extra = at_hook["peak"] - before
    fp32_copy = rows * vocab * 4
    assert loss_backward_extra < 0.3 * fp32_copy, f"{loss_backward_extra / 2**30:.2f} GiB extra"


@pytest.fixture(scope="module")
def parallel_context():
    from megatron_ext.parallel.config import ParallelConfig
    from megatron_ext.parallel.init import destroy_parallel, initialize_parallel

    parallel = ParallelConfig(device="cuda", use_distributed_optimizer=True)
    ctx = initialize_parallel(parallel, seed=5)
    yield ctx, parallel
    destroy_parallel()


def _micro_batches(step: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(50 + step)
    tokens = torch.randint(1, VOCAB, (MICRO_BATCH, SEQ + 1), generator=gen)
    return split_micro_batches(tokens, MICRO_BATCH)


def _build(parallel, model_cfg, precision, state):
    """``(chunks, ddp, optimizer, snapshot of the initial weights)`` on the GPU."""
    from megatron_ext.models.builder import build_model
    from megatron_ext.training.optimizer import OptimizerConfig, prepare_for_training

    chunks = build_model(model_cfg, parallel, precision, "cuda")
    if state is not None:
        chunks[0].load_state_dict(state)
    snapshot = {
        k: v.detach().clone() for k, v in chunks[0].state_dict().items() if "extra" not in k
    }
    ddp, optimizer = prepare_for_training(
        chunks, parallel, precision, OptimizerConfig(), peak_lr=1e-3, min_lr=1e-4
    )
    return chunks, ddp, optimizer, snapshot


def _train(ctx, parallel, model_cfg, precision, state):
    from megatron_ext.training.step import train_step

    chunks, ddp, optimizer, snapshot = _build(parallel, model_cfg, precision, state)
    results = [
        train_step(ddp, optimizer, _micro_batches(i), SEQ, ctx.torch_device, ctx.pp_group(), True)
        for i in range(3)
    ]
    return type(chunks[0]).__name__, results, snapshot


def _small_model():
    from megatron_ext.models.config import ModelConfig

    return ModelConfig(
        num_layers=2,
        hidden_size=256,
        ffn_hidden_size=704,
        num_attention_heads=4,
        num_query_groups=2,
        seq_length=SEQ,
        vocab_size=VOCAB,
    )


@pytest.mark.parametrize("dtype,rtol", [("fp32", 2e-4), ("bf16", 2e-2)])
def test_fast_path_model_trains_like_plain(parallel_context, dtype, rtol):
    from megatron_ext.models.config import PrecisionConfig

    ctx, parallel = parallel_context
    precision = PrecisionConfig(dtype=dtype)
    base = _small_model()
    off = replace(base, compile_layers="off", fused_cross_entropy="off")
    plain_class, plain, state = _train(ctx, parallel, off, precision, None)
    # auto on CUDA without Transformer Engine: the fast path.
    from torch._dynamo.utils import counters

    from megatron_ext.models.fast_path import compile_counts

    counters.clear()
    fast_class, fast, _ = _train(ctx, parallel, base, precision, state)
    counts = compile_counts()
    assert counts["graph_breaks"] == 0, counts["graph_break_reasons"]
    assert plain_class == "GPTModel"
    from megatron_ext.models.specs import transformer_engine_available

    if not transformer_engine_available():
        assert fast_class == "ChunkedLossGPTModel"
    plain_losses = [r.loss for r in plain]
    assert abs(plain_losses[0] - torch.log(torch.tensor(VOCAB)).item()) < 0.5
    torch.testing.assert_close([r.loss for r in fast], plain_losses, rtol=rtol, atol=0.0)
    torch.testing.assert_close(
        [r.grad_norm for r in fast], [r.grad_norm for r in plain], rtol=10 * rtol, atol=0.0
    )


def test_wgrad_accumulation_on_cuda_matches_float64():
    from megatron_ext.models.wgrad_fusion import (
        accumulate_wgrad,
        cuda_fp32_accumulation_available,
    )

    gen = torch.Generator(device="cuda").manual_seed(1)
    grad_output = torch.randn(512, 2, 384, device="cuda", generator=gen).to(torch.bfloat16)
    inp = torch.randn(512, 2, 256, device="cuda", generator=gen).to(torch.bfloat16)
    main_grad = torch.randn(384, 256, device="cuda", generator=gen)
    expected = main_grad.double() + grad_output.double().flatten(0, 1).t() @ inp.double().flatten(
        0, 1
    )
    accumulate_wgrad(main_grad, grad_output, inp)
    error = float((main_grad.double() - expected).norm() / expected.norm())
    if cuda_fp32_accumulation_available(torch.cuda.current_device()):
        assert error < 1e-5, error  # fp32 accumulation of exact bf16 products
    else:  # an older torch: the bf16 product rounded once, then added
        assert error < 1e-2, error


def test_wgrad_fusion_trains_like_the_ddp_add(parallel_context):
    from torch._dynamo.utils import counters

    from megatron_ext.models.config import PrecisionConfig
    from megatron_ext.models.fast_path import compile_counts
    from megatron_ext.models.specs import transformer_engine_available

    if transformer_engine_available():
        pytest.skip("the fusion applies to the local layers; TE fuses the accumulation itself")
    ctx, parallel = parallel_context
    precision = PrecisionConfig(dtype="bf16")
    base = _small_model()
    _, unfused, state = _train(ctx, parallel, base, precision, None)
    counters.clear()
    _, fused, _ = _train(ctx, parallel, replace(base, wgrad_fusion="on"), precision, state)
    counts = compile_counts()
    assert counts["graph_breaks"] == 0, counts["graph_break_reasons"]
    torch.testing.assert_close(
        [r.loss for r in fused], [r.loss for r in unfused], rtol=2e-2, atol=0
    )
    torch.testing.assert_close(
        [r.grad_norm for r in fused], [r.grad_norm for r in unfused], rtol=5e-2, atol=0
    )


def test_first_host_wait_of_a_step_is_the_gradient_norm(parallel_context):
    """The host reads the loss only after the gradient norm, so megatron-core's per-parameter
    preparation of the gradients and of the norm runs while the GPU finishes the backward.

    CUDA's sync debug mode warns at every call that makes the host wait for the GPU; each
    warning carries the Python file that made the call.
    """
    import warnings

    from megatron_ext.models.config import PrecisionConfig
    from megatron_ext.training.step import train_step

    ctx, parallel = parallel_context
    model_cfg = replace(_small_model(), compile_layers="off")
    _, ddp, optimizer, _ = _build(parallel, model_cfg, PrecisionConfig(dtype="bf16"), None)
    pp_group = ctx.pp_group()
    for step in range(2):  # the first update creates the optimizer state
        train_step(ddp, optimizer, _micro_batches(step), SEQ, ctx.torch_device, pp_group, True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = train_step(
                ddp, optimizer, _micro_batches(7), SEQ, ctx.torch_device, pp_group, True
            )
    finally:
        torch.cuda.set_sync_debug_mode("default")
    waits = [w.filename for w in caught if "synchroniz" in str(w.message)]
    assert waits, "a step reads its loss and norm, so the host must wait at least once"
    assert not waits[0].endswith("step.py"), waits  # the loss was read first
    assert any("clip_grads" in name or "multi_tensor" in name for name in waits), waits
    assert result.forward_backward_s > 0 and result.optimizer_s >= 0
