"""``adamw_update_``, the AdamW update that also writes the model's copy of the weight: the same
arithmetic as torch's AdamW kernels, eager and compiled by Inductor."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from megatron_ext.training.fused_param_copy import (
    AdamWWritingModelParams,
    adamw_update_,
    convert,
)
from megatron_ext.training.step import fuses_grad_scale

BETAS, EPS = (0.9, 0.95), 1e-8
LRS = (5e-4, 1e-3, 9e-4, 2e-4)


def _state(n: int, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {
        "param": torch.randn(n, generator=generator) * 0.03,
        "grads": [torch.randn(n, generator=generator) * 0.01 for _ in LRS],
    }


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("weight_decay", [0.1, 0.0])
@pytest.mark.parametrize("grad_scale", [None, 3.7])
def test_matches_torch_adamw(fused, weight_decay, grad_scale):
    start = _state(10_000, seed=0)
    reference = start["param"].clone().requires_grad_()
    adam = torch.optim.AdamW(
        [reference], lr=LRS[0], betas=BETAS, eps=EPS, weight_decay=weight_decay, fused=fused
    )
    param = start["param"].clone()
    exp_avg, exp_avg_sq, step = torch.zeros_like(param), torch.zeros_like(param), torch.zeros(())
    model_param = torch.empty_like(param, dtype=torch.bfloat16)
    scale = None if grad_scale is None else torch.tensor([grad_scale])
    for lr, grad in zip(LRS, start["grads"], strict=True):
        reference.grad = grad.clone()
        adam.param_groups[0]["lr"] = lr
        if fused and scale is not None:
            adam.grad_scale = scale
        elif scale is not None:  # the unfused update takes no grad_scale: unscale first
            reference.grad /= scale
        adam.step()
        adam.__dict__.pop("grad_scale", None)
        ours = grad.clone()
        hyper = torch.tensor([lr, *BETAS, EPS, weight_decay])
        adamw_update_(param, ours, exp_avg, exp_avg_sq, step, hyper, scale, model_param)

        state = adam.state[reference]
        assert step.item() == state["step"].item()
        torch.testing.assert_close(param, reference.detach(), rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(exp_avg, state["exp_avg"], rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(exp_avg_sq, state["exp_avg_sq"], rtol=1e-5, atol=1e-12)
        # The model's copy is the cast of the new fp32 weight, bit for bit.
        assert torch.equal(model_param, param.to(torch.bfloat16))
        # The gradient is left behind divided by grad_scale, as torch's fused kernel leaves it.
        torch.testing.assert_close(ours, reference.grad, rtol=1e-6, atol=0)
    assert not torch.equal(param, start["param"])


@pytest.mark.timeout(300)
def test_compiled_update_is_one_graph_for_every_weight_and_learning_rate():
    """Inductor (the CPU backend here, Triton on CUDA) through ``convert``: weights of different
    sizes and ranks, their model copies views at different (also odd) offsets of one bf16
    buffer, a new learning rate at every step and the clip's grad_scale at every other: one graph
    per kind of call (with and without grad_scale), and the same weights, moments and copies as
    the eager update."""
    torch._dynamo.reset()
    counters.clear()
    shapes, offsets = [(40, 25), (3000,), (64, 32), (333,)], [0, 1024, 5000, 7111]
    runs = {}
    for compiled in (True, False):
        generator = torch.Generator().manual_seed(0)
        weights = [torch.nn.Parameter(torch.randn(s, generator=generator)) for s in shapes]
        buffer = torch.zeros(20_000, dtype=torch.bfloat16)
        copies = {
            w: buffer[o : o + w.numel()].view(w.shape)
            for w, o in zip(weights, offsets, strict=True)
        }
        adam = torch.optim.AdamW(weights, betas=BETAS, eps=EPS, weight_decay=0.1, fused=True)
        convert(adam, copies, compiled)
        for step, lr in enumerate(LRS):
            adam.param_groups[0]["lr"] = lr
            for w in weights:
                w.grad = torch.randn(w.shape, generator=generator) * 0.01
            if step % 2:
                adam.grad_scale = torch.tensor([2.5])
            adam.step()
            adam.__dict__.pop("grad_scale", None)
            assert all(torch.equal(copies[w], w.detach().to(torch.bfloat16)) for w in weights)
        runs[compiled] = (weights, adam)
    assert counters["stats"]["unique_graphs"] == 2
    assert not counters["graph_break"]
    (compiled_weights, compiled_adam), (eager_weights, eager_adam) = runs[True], runs[False]
    for a, b in zip(compiled_weights, eager_weights, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(
                compiled_adam.state[a][key], eager_adam.state[b][key], rtol=1e-5, atol=1e-12
            )


def test_the_clip_rides_in_the_update():
    """``training.step`` hands the clip to the update as its grad_scale, also when torch's
    groups are not switched to the fused kernel (the update replaces torch's either way)."""
    adam = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))], fused=False)
    assert not fuses_grad_scale(adam)
    adam.__class__ = AdamWWritingModelParams
    assert fuses_grad_scale(adam)
    adam.grad_scale = torch.ones(1)
    assert not fuses_grad_scale(adam)  # already carrying one


def test_setting_is_read_and_checked():
    from megatron_ext.config.errors import ConfigError
    from megatron_ext.config.loader import load_config
    from megatron_ext.training.experiment import ExperimentConfig
    from megatron_ext.training.optimizer import OptimizerConfig, _copy_in_update

    # An unquoted YAML on/off arrives as a boolean and is read as the word.
    cfg = load_config(ExperimentConfig, None, ["--optimizer.fused_param_copy=off"])
    assert cfg.optimizer.fused_param_copy == "off"
    with pytest.raises(ConfigError, match="optimizer.fused_param_copy"):
        load_config(ExperimentConfig, None, ["--optimizer.fused_param_copy=maybe"])
    # auto: on for torch's fused AdamW on CUDA only; on: anywhere; off: never.
    assert _copy_in_update(OptimizerConfig(), on_cuda=True)
    assert not _copy_in_update(OptimizerConfig(), on_cuda=False)
    assert not _copy_in_update(OptimizerConfig(fused_adamw=False), on_cuda=True)
    assert _copy_in_update(OptimizerConfig(fused_param_copy="on", fused_adamw=False), False)
    assert not _copy_in_update(OptimizerConfig(fused_param_copy="off"), on_cuda=True)
    with pytest.raises(ValueError, match="auto, on or off"):
        _copy_in_update(OptimizerConfig(fused_param_copy="maybe"), on_cuda=True)
