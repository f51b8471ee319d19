"""The _foreach gradient norm and scale that replace megatron-core's local fallbacks, and the
gradient clip folded into torch's fused AdamW update."""

from __future__ import annotations

import pytest
import torch

from megatron_ext.training.multi_tensor import foreach_l2_norm, foreach_scale, install
from megatron_ext.training.step import fuses_grad_scale


def _tensors(seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(7,), (3, 5), (64, 33), (1,), (2, 3, 4)]
    return [torch.randn(shape, generator=gen) for shape in shapes]


def test_l2_norm_matches_a_float64_reference():
    tensors = _tensors(0)
    norm, per_tensor = foreach_l2_norm(2048, torch.zeros(1, dtype=torch.int), [tensors], False)
    reference = torch.cat([t.double().flatten() for t in tensors]).norm()
    assert per_tensor is None
    assert norm.shape == (1,) and norm.dtype == torch.float32
    assert norm.item() == pytest.approx(reference.item(), rel=1e-6)
    # Two lists are one set of tensors.
    split, _ = foreach_l2_norm(2048, None, [tensors[:2], tensors[2:]], False)
    assert split.item() == pytest.approx(reference.item(), rel=1e-6)


def test_l2_norm_rejects_what_it_does_not_compute():
    with pytest.raises(ValueError, match="per-tensor"):
        foreach_l2_norm(2048, None, [_tensors(0)], True)
    with pytest.raises(ValueError, match="no tensors"):
        foreach_l2_norm(2048, None, [[]], False)


@pytest.mark.parametrize("scale", [0.37, 1.0])
def test_scale_equals_megatron_local_fallback(scale):
    from megatron.core.utils import local_multi_tensor_scale

    # In place (gradient clipping: dst is src) and into other tensors with a dtype cast (main
    # fp32 parameters into bf16 model parameters), in one call.
    grads, mains = _tensors(1), _tensors(2)
    models = [torch.zeros_like(t, dtype=torch.bfloat16) for t in mains]
    sources, targets = grads + mains, grads + models

    ref_grads = [g.clone() for g in grads]
    ref_models = [m.clone() for m in models]
    local_multi_tensor_scale(2048, None, [ref_grads + mains, ref_grads + ref_models], scale)

    foreach_scale(2048, None, [sources, targets], scale)
    for got, want in zip(grads + models, ref_grads + ref_models, strict=True):
        assert torch.equal(got, want)
    assert not torch.equal(models[0], torch.zeros_like(models[0]))


def test_scale_needs_pairs():
    with pytest.raises(ValueError, match="3 sources but 2 targets"):
        foreach_scale(2048, None, [_tensors(0)[:3], _tensors(0)[:2]], 0.5)


def test_install_replaces_only_megatron_local_fallbacks(monkeypatch):
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads, optimizer

    # This machine has neither TE nor apex: megatron-core bound its local fallbacks (or, when an
    # earlier test built an optimizer, ours).
    assert clip_grads.l2_norm_impl in (utils.local_multi_tensor_l2_norm, foreach_l2_norm)
    monkeypatch.setattr(clip_grads, "l2_norm_impl", utils.local_multi_tensor_l2_norm)
    monkeypatch.setattr(clip_grads, "multi_tensor_scale_impl", utils.local_multi_tensor_scale)
    monkeypatch.setattr(optimizer, "multi_tensor_scale_impl", utils.local_multi_tensor_scale)
    assert install() == 3
    assert clip_grads.l2_norm_impl is foreach_l2_norm
    assert clip_grads.multi_tensor_scale_impl is foreach_scale
    assert optimizer.multi_tensor_scale_impl is foreach_scale
    assert install() == 3  # idempotent

    def vendor_kernel(*args):  # stands for TE's or apex's multi_tensor_l2norm
        raise AssertionError("not called")

    monkeypatch.setattr(clip_grads, "l2_norm_impl", vendor_kernel)
    assert install() == 2
    assert clip_grads.l2_norm_impl is vendor_kernel


def _adam(fused: bool | None) -> torch.optim.AdamW:
    params = [torch.nn.Parameter(t) for t in _tensors(3)]
    return torch.optim.AdamW(params, **({} if fused is None else {"fused": fused}))


def check_clip_in_update(tensors, device: str) -> None:
    """Three fused AdamW steps given the clip as ``grad_scale`` equal three steps on gradients
    clipped first: parameters, first moments, and the clipped gradients the kernel leaves behind.
    ``tensors(seed)``: a list of tensors on ``device`` (also used by the GPU test)."""
    clip_coeff = 0.0123

    def adam():
        params = [torch.nn.Parameter(t) for t in tensors(3)]
        return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, fused=True), params

    (clipped, clipped_params), (in_update, in_update_params) = adam(), adam()
    assert fuses_grad_scale(in_update)
    for step in range(3):  # the moments carry the clipped gradients into later steps
        raw = tensors(20 + step)
        for param, grad in zip(clipped_params, raw, strict=True):
            param.grad = grad * clip_coeff
        clipped.step()
        for param, grad in zip(in_update_params, raw, strict=True):
            param.grad = grad.clone()
        in_update.grad_scale = torch.full((1,), 1.0 / clip_coeff, device=device)
        in_update.step()
        del in_update.grad_scale
        for got, want in zip(in_update_params, clipped_params, strict=True):
            torch.testing.assert_close(got.grad, want.grad, rtol=1e-6, atol=0)
    for got, want in zip(in_update_params, clipped_params, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    for got, want in zip(in_update.state.values(), clipped.state.values(), strict=True):
        torch.testing.assert_close(got["exp_avg"], want["exp_avg"], rtol=1e-6, atol=1e-9)
    assert not torch.equal(in_update_params[0], tensors(3)[0])  # the updates ran


def test_clip_in_the_fused_update_equals_clipping_first():
    check_clip_in_update(_tensors, "cpu")


def test_only_the_fused_update_takes_a_grad_scale():
    assert not fuses_grad_scale(_adam(fused=False))
    assert not fuses_grad_scale(_adam(fused=None))
    assert not fuses_grad_scale(torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1))
    assert not fuses_grad_scale(None)
    busy = _adam(fused=True)
    busy.grad_scale = torch.ones(1)  # set by someone else (an AMP grad scaler): leave it alone
    assert not fuses_grad_scale(busy)
