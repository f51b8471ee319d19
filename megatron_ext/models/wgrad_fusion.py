"""A linear layer whose weight-gradient GEMM accumulates straight into megatron DDP's ``main_grad``.

megatron-core's DDP keeps an fp32 ``main_grad`` buffer per parameter. Without Transformer Engine
or apex every weight gradient takes two passes: the GEMM writes a bf16 ``weight.grad``, then a DDP
hook adds it into ``main_grad`` (for the 1.09B model on an H100, 4.8 ms per step of fp32 adds).
megatron-core's own fusion (``gradient_accumulation_fusion``) needs apex's CUDA extension for its
own linear layers (TE layers bring their own, but the output layer is megatron-core's: the builder
turns it on only with apex), and its autograd function sets attributes on the weight in the
backward, which ``torch.compile`` cannot trace (the compiled layer would break at every linear).

Here the GEMM accumulates into ``main_grad`` itself: ``main_grad += grad_output^T @ input`` with
fp32 accumulation and no bf16 intermediate (cuBLAS through ``torch.addmm(..., out_dtype=float32)``
on CUDA; an upcast ``addmm_`` elsewhere). It is a custom op that declares the mutation of
``main_grad``, and ``main_grad`` enters the autograd function as an input, so Dynamo and
AOTAutograd trace the layer as one graph.

The DDP hook still has to run for the weight: with ``overlap_grad_reduce`` it is what marks the
weight's bucket ready for its reduce. So, as megatron-core's own fusion does, the backward hands
autograd an uninitialised placeholder gradient (an allocation, no kernel), and
``linear_into_main_grad`` sets ``weight.grad_added_to_main_grad`` (which DDP resets every step) in
the forward: the hook then skips its add, drops the placeholder and registers the weight as ready.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor


def _matrices(grad_output: Tensor, inp: Tensor) -> tuple[Tensor, Tensor]:
    """``[tokens, out]`` and ``[tokens, in]`` views of ``[..., out]`` and ``[..., in]``."""
    return grad_output.reshape(-1, grad_output.shape[-1]), inp.reshape(-1, inp.shape[-1])


@functools.cache
def cuda_fp32_accumulation_available(device_index: int) -> bool:
    """Whether this torch's cuBLAS ``addmm`` adds a bf16 product into an fp32 tensor in place.

    ``torch.addmm(fp32, bf16, bf16, out_dtype=float32)`` with an fp32 ``input`` is accepted by
    recent torch releases; earlier ones with ``out_dtype`` refuse an fp32 ``input`` next to bf16
    matrices. Checked once per device on small tensors against the upcast result.
    """
    device = torch.device("cuda", device_index)
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(64, 32, device=device, generator=generator).to(torch.bfloat16)
    b = torch.randn(32, 48, device=device, generator=generator).to(torch.bfloat16)
    acc = torch.randn(64, 48, device=device, generator=generator)
    expected = acc + a.float() @ b.float()
    try:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    except (RuntimeError, TypeError):
        return False
    return bool(torch.allclose(acc, expected, rtol=1e-3, atol=1e-3))


@torch.library.custom_op("megatron_ext::accumulate_wgrad", mutates_args=("main_grad",))
def accumulate_wgrad(main_grad: Tensor, grad_output: Tensor, inp: Tensor) -> None:
    """``main_grad += grad_output^T @ inp`` over all leading (token) dimensions."""
    g, x = _matrices(grad_output, inp)
    low_precision = g.dtype in (torch.bfloat16, torch.float16)
    if main_grad.is_cuda and main_grad.dtype == torch.float32 and low_precision:
        if cuda_fp32_accumulation_available(main_grad.device.index):
            torch.addmm(main_grad, g.t(), x, out_dtype=torch.float32, out=main_grad)
        else:  # an older torch: the unfused two passes, as without fusion
            main_grad.add_(g.t() @ x)
    else:
        main_grad.addmm_(g.t().to(main_grad.dtype), x.to(main_grad.dtype))


@accumulate_wgrad.register_fake
def _accumulate_wgrad_fake(main_grad: Tensor, grad_output: Tensor, inp: Tensor) -> None:
    return None


class _LinearIntoMainGrad(torch.autograd.Function):
    """``input @ weight^T``; the backward adds the weight gradient into ``main_grad`` and returns
    the input gradient and a placeholder for the weight's."""

    @staticmethod
    def forward(ctx, inp: Tensor, weight: Tensor, main_grad: Tensor) -> Tensor:
        ctx.save_for_backward(inp, weight)
        # Not saved with the others: main_grad is a view of DDP's one gradient buffer, whose
        # version counter every other parameter's accumulation bumps before this backward runs.
        ctx.main_grad = main_grad
        return torch.matmul(inp, weight.t())

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        inp, weight = ctx.saved_tensors
        grad_input = grad_output.matmul(weight)
        torch.ops.megatron_ext.accumulate_wgrad(ctx.main_grad, grad_output, inp)
        # Not a gradient: it makes autograd run the weight's DDP hook, which (seeing
        # grad_added_to_main_grad) drops it without reading it.
        placeholder = torch.empty_like(weight)
        return grad_input, placeholder, None


def linear_into_main_grad(inp: Tensor, weight: Tensor) -> Tensor:
    """``inp @ weight^T`` whose weight gradient is added to ``weight.main_grad`` in the GEMM.

    ``weight`` must be a parameter of megatron-core's DDP (it owns ``main_grad`` and the hook that
    drops the placeholder gradient) and must not be used elsewhere in the same backward: its
    ``grad_added_to_main_grad`` is set here, so DDP's hook would skip any real gradient too.
    """
    weight.grad_added_to_main_grad = True
    return _LinearIntoMainGrad.apply(inp, weight, weight.main_grad)
