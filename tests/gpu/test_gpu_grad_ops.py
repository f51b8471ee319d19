"""The gradient norm, scale and clip of ``training.multi_tensor`` / ``training.step`` on CUDA.

Run by ``tests/gpu/run_gpu_checks.sh``; skipped without CUDA. On the GPU's kernels: the
``_foreach`` norm against a float64 reference and without a host synchronisation (megatron-core's
local fallback synchronises once per tensor), the in-place scale against the fallback, torch's
fused AdamW given the clip as ``grad_scale`` against clipping first, and the compiled update that
writes the model's bf16 weights (``optimizer.fused_param_copy``) against torch's fused AdamW.
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


def test_update_writing_model_params_matches_torch_fused_adamw_on_cuda():
    """``optimizer.fused_param_copy`` on the GPU: the Inductor-compiled update against torch's
    fused AdamW over four steps (a new learning rate each, the clip as ``grad_scale`` at two),
    the model's bf16 copy the exact cast of the new weight, no host synchronisation in a step,
    one compiled graph per kind of call and at most two kernels per weight."""
    from torch._dynamo.utils import counters

    from megatron_ext.training.fused_param_copy import convert

    torch._dynamo.reset()
    counters.clear()
    ours = [torch.nn.Parameter(t) for t in _tensors(2)]
    reference = [torch.nn.Parameter(t.detach().clone()) for t in ours]
    model_copies = {p: torch.empty_like(p, dtype=torch.bfloat16) for p in ours}
    kwargs = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, fused=True)
    torch_adam = torch.optim.AdamW(reference, **kwargs)
    adam = convert(torch.optim.AdamW(ours, **kwargs), model_copies, compiled=True)
    for step, grads in enumerate((_tensors(3 + k) for k in range(4)), start=1):
        for group in adam.param_groups + torch_adam.param_groups:
            group["lr"] = 1e-3 / step
        for a, b, grad in zip(ours, reference, grads, strict=True):
            a.grad, b.grad = grad.clone(), grad.clone()
        if step % 2 == 0:
            adam.grad_scale = torch.full((1,), 1.5, device="cuda")
            torch_adam.grad_scale = adam.grad_scale
        torch_adam.step()
        if step == 1:
            adam.step()  # compiles
        else:
            torch.cuda.synchronize()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                torch.cuda.set_sync_debug_mode("error")
                try:
                    adam.step()
                finally:
                    torch.cuda.set_sync_debug_mode("default")
                torch.cuda.synchronize()
            kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
            kernels = [e for e in kernels if "Memcpy" not in e.name]
            assert len(kernels) <= 2 * len(ours), [e.name for e in kernels]
        for opt in (adam, torch_adam):
            opt.__dict__.pop("grad_scale", None)
        for a, b in zip(ours, reference, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
            assert torch.equal(model_copies[a], a.detach().to(torch.bfloat16))
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=0)
    assert counters["stats"]["unique_graphs"] == 2  # with and without grad_scale
    assert not counters["graph_break"]
