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
from tests.unit.training.test_training_multi_tensor import check_clip_in_update

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
    check_clip_in_update(_tensors, "cuda")
