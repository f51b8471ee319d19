"""The gradient norm, scale and clip of ``training.multi_tensor`` / ``training.step`` on CUDA.

Run by ``tests/gpu/run_gpu_checks.sh``; skipped without CUDA. On the GPU's kernels: the
``_foreach`` norm against a float64 reference and without a host synchronisation (megatron-core's
local fallback synchronises once per tensor), the in-place scale against the fallback, and torch's
fused AdamW given the clip as ``grad_scale`` against clipping first.
"""

from __future__ import annotations

import pytest
import torch

from megatron_ext.training.multi_tensor import foreach_l2_norm, foreach_scale

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _tensors(seed: int) -> list[torch.Tensor]:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    shapes = [(4096, 1024), (1024,), (5632, 2048), (3, 7)]
    return [torch.randn(shape, device="cuda", generator=gen) for shape in shapes]


def test_norm_matches_float64_without_host_sync():
    from megatron.core.utils import local_multi_tensor_l2_norm

    tensors = _tensors(0)
    reference = torch.cat([t.double().flatten() for t in tensors]).norm().item()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        norm, _ = foreach_l2_norm(2048, None, [tensors], False)
        with pytest.raises(RuntimeError, match="synchroniz"):
            local_multi_tensor_l2_norm(2048, None, [tensors], False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert norm.device.type == "cuda" and norm.shape == (1,)
    assert norm.item() == pytest.approx(reference, rel=1e-6)


def test_in_place_scale_matches_megatron_fallback():
    from megatron.core.utils import local_multi_tensor_scale

    ours, theirs = _tensors(1), _tensors(1)
    foreach_scale(2048, None, [ours, ours], 0.123)
    local_multi_tensor_scale(2048, None, [theirs, theirs], 0.123)
    for got, want in zip(ours, theirs, strict=True):
        assert torch.equal(got, want)


def test_fused_adamw_with_grad_scale_equals_clipping_first():
    clip_coeff = 0.0123

    def adam():
        params = [torch.nn.Parameter(t) for t in _tensors(2)]
        return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, fused=True), params

    (clipped, clipped_params), (in_update, in_update_params) = adam(), adam()
    for step in range(3):
        raw = _tensors(10 + step)
        for param, grad in zip(clipped_params, raw, strict=True):
            param.grad = grad * clip_coeff
        clipped.step()
        for param, grad in zip(in_update_params, raw, strict=True):
            param.grad = grad.clone()
        in_update.grad_scale = torch.tensor([1.0 / clip_coeff], device="cuda")
        in_update.step()
        del in_update.grad_scale
    for got, want in zip(in_update_params, clipped_params, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    for got, want in zip(in_update.state.values(), clipped.state.values(), strict=True):
        torch.testing.assert_close(got["exp_avg"], want["exp_avg"], rtol=1e-6, atol=1e-9)
