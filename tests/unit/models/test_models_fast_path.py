"""The chunked cross-entropy equals torch's; the fast path switches on where it should."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_ext.models.config import ModelConfig
from megatron_ext.models.fast_path import FastPathPlan, resolve_fast_path
from megatron_ext.models.fused_loss import chunked_cross_entropy


def _inputs(rows: int, vocab: int, dtype: torch.dtype, seed: int):
    generator = torch.Generator().manual_seed(seed)
    logits = (3.0 * torch.randn(rows, vocab, generator=generator)).to(dtype)
    target = torch.randint(0, vocab, (rows,), generator=generator)
    # Per-token weights as megatron's loss applies them (mask / token count), zeros included.
    weights = torch.rand(rows, generator=generator) * (torch.arange(rows) % 5 != 0)
    return logits, target, weights


def _loss_and_grad(fn, logits, target, weights):
    x = logits.detach().clone().requires_grad_(True)
    loss = fn(x, target)
    (loss * weights).sum().backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize("rows,chunk_rows", [(37, 8), (64, 64), (5, 1), (16, 1000)])
def test_fp32_matches_torch_cross_entropy(rows, chunk_rows):
    logits, target, weights = _inputs(rows, 96, torch.float32, seed=rows)
    ours = _loss_and_grad(
        lambda x, t: chunked_cross_entropy(x, t, chunk_rows=chunk_rows), logits, target, weights
    )
    ref = _loss_and_grad(
        lambda x, t: F.cross_entropy(x, t, reduction="none"), logits, target, weights
    )
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours[1], ref[1], rtol=1e-6, atol=1e-7)


def test_bf16_logits_give_fp32_loss_and_bf16_grad_close_to_fp32_reference():
    logits, target, weights = _inputs(40, 256, torch.bfloat16, seed=3)
    loss, grad = _loss_and_grad(
        lambda x, t: chunked_cross_entropy(x, t, chunk_rows=16), logits, target, weights
    )
    ref_loss, ref_grad = _loss_and_grad(
        lambda x, t: F.cross_entropy(x.float(), t, reduction="none"), logits, target, weights
    )
    assert loss.dtype == torch.float32 and grad.dtype == torch.bfloat16
    # The loss is computed in fp32 from the same bf16 values: equal to fp32 rounding.
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-5)
    # The gradient is computed in fp32 from those values and rounded to bf16 once: within half a
    # bf16 step (2**-9 relative) of the fp32 reference.
    torch.testing.assert_close(grad.float(), ref_grad.float(), rtol=2**-9, atol=1e-30)


def test_keeps_leading_shape_and_sequence_first_layout():
    logits, target, _ = _inputs(24, 64, torch.float32, seed=5)
    logits_sbv, target_sb = logits.view(6, 4, 64), target.view(6, 4)
    loss = chunked_cross_entropy(logits_sbv, target_sb, chunk_rows=7)
    assert loss.shape == (6, 4)
    expected = F.cross_entropy(logits, target, reduction="none").view(6, 4)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)


def test_large_logits_do_not_overflow():
    logits = torch.tensor([[1000.0, 0.0, -1000.0], [-50.0, 80.0, 80.0]])
    target = torch.tensor([0, 2])
    loss = chunked_cross_entropy(logits, target)
    expected = F.cross_entropy(logits, target, reduction="none")
    assert torch.isfinite(loss).all()
    torch.testing.assert_close(loss, expected)


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="disagree"):
        chunked_cross_entropy(torch.zeros(4, 8), torch.zeros(5, dtype=torch.long))


def test_default_backward_leaves_the_logits_intact():
    logits, target, weights = _inputs(12, 32, torch.float32, seed=4)
    x = logits.clone().requires_grad_(True)
    (chunked_cross_entropy(x, target, chunk_rows=5) * weights).sum().backward()
    torch.testing.assert_close(x.detach(), logits, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_overwrite_logits_writes_the_same_gradient_into_the_logits_memory(dtype):
    logits, target, weights = _inputs(21, 48, dtype, seed=6)
    reference = _loss_and_grad(
        lambda x, t: chunked_cross_entropy(x, t, chunk_rows=4), logits, target, weights
    )
    x = logits.clone().requires_grad_(True)
    y = x * 1  # a non-leaf intermediate, as a model's logits are
    seen = []
    y.register_hook(seen.append)
    loss = chunked_cross_entropy(y, target, chunk_rows=4, overwrite_logits=True)
    (loss * weights).sum().backward()
    torch.testing.assert_close(loss.detach(), reference[0], rtol=0, atol=0)
    torch.testing.assert_close(x.grad, reference[1], rtol=0, atol=0)
    assert seen[0].data_ptr() == y.data_ptr()  # no second [rows, V] tensor


def test_overwrite_logits_without_autograd_computes_the_loss_and_writes_nothing():
    # Evaluation: the model's logits under no_grad are leaves that do not require grad.
    logits, target, _ = _inputs(10, 24, torch.float32, seed=7)
    x = logits.clone()
    with torch.no_grad():
        loss = chunked_cross_entropy(x, target, chunk_rows=3, overwrite_logits=True)
    torch.testing.assert_close(loss, F.cross_entropy(logits, target, reduction="none"))
    torch.testing.assert_close(x, logits, rtol=0, atol=0)


def test_overwrite_logits_refuses_a_leaf():
    logits, target, _ = _inputs(4, 8, torch.float32, seed=8)
    with pytest.raises(ValueError, match="leaf"):
        chunked_cross_entropy(logits.requires_grad_(True), target, overwrite_logits=True)


@pytest.mark.parametrize("overwrite", [False, True])
def test_second_backward_is_refused_not_wrong(overwrite):
    logits, target, _ = _inputs(8, 16, torch.float32, seed=9)
    x = logits.clone().requires_grad_(True)
    loss = chunked_cross_entropy(x * 1, target, overwrite_logits=overwrite).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward"):
        loss.backward()


@pytest.mark.parametrize(
    "backend,device,compile_layers,fused,expected",
    [
        ("local", "cuda", "auto", "auto", FastPathPlan(True, True)),
        ("local", "cpu", "auto", "auto", FastPathPlan(False, False)),
        ("transformer_engine", "cuda", "auto", "auto", FastPathPlan(False, False)),
        ("local", "cpu", "on", "on", FastPathPlan(True, True)),
        ("local", "cuda", "off", "auto", FastPathPlan(False, True)),
        ("local", "cuda", "auto", "off", FastPathPlan(True, False)),
    ],
)
def test_resolve_fast_path(backend, device, compile_layers, fused, expected):
    model = ModelConfig(compile_layers=compile_layers, fused_cross_entropy=fused)
    assert resolve_fast_path(model, backend, device) == expected


@pytest.mark.parametrize(
    "backend,device,setting,expected",
    [
        ("local", "cuda", "off", False),
        ("local", "cuda", "on", True),
        ("local", "cpu", "on", True),
        ("transformer_engine", "cuda", "on", False),  # TE fuses the accumulation itself
        ("local", "cuda", "auto", True),
        ("local", "cpu", "auto", False),
        ("transformer_engine", "cuda", "auto", False),
    ],
)
def test_wgrad_fusion_is_opt_in_and_local_only(backend, device, setting, expected):
    plan = resolve_fast_path(ModelConfig(wgrad_fusion=setting), backend, device)
    assert ModelConfig().wgrad_fusion == "off"
    assert plan.wgrad_fusion is expected
    assert ("weight gradients into main_grad" in plan.describe()) is expected


def test_unknown_setting_is_a_clear_error():
    with pytest.raises(ValueError, match="compile_layers"):
        resolve_fast_path(ModelConfig(compile_layers="yes"), "local", "cuda")


def test_te_layers_ask_for_gradient_accumulation_fusion_only_where_apex_built_it():
    """The output layer is megatron-core's ColumnParallelLinear, which raises at construction
    with the fusion on and without apex's fused_weight_gradient_mlp_cuda (TE alone is no help)."""
    from megatron.core.tensor_parallel import layers

    from megatron_ext.models.builder import gradient_accumulation_fusion

    assert gradient_accumulation_fusion("local") is False
    available = layers._grad_accum_fusion_available
    assert gradient_accumulation_fusion("transformer_engine") is available
    if not available:  # this machine: no apex
        with pytest.raises(RuntimeError, match="fused_weight_gradient_mlp_cuda"):
            from megatron.core.transformer.transformer_config import TransformerConfig

            config = TransformerConfig(
                num_layers=1,
                hidden_size=8,
                num_attention_heads=1,
                gradient_accumulation_fusion=True,
                use_cpu_initialization=True,
            )
            layers.ColumnParallelLinear(8, 16, config=config, init_method=lambda w: w, bias=False)
