"""Activation statistics arithmetic and hook behaviour on small modules (no process group).

The exactness across TP/PP/DP on the real megatron-core model is checked in
tests/distributed/test_monitoring_parity.py; here: the limit fractions, NaN handling, merging of
partial sums, and that activation recomputation does not count a forward twice.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from megatron_ext.monitoring.activations import (
    ActivationStats,
    flatten_layer_stats,
    reduce_layer_stats,
    summarize,
    tensor_sums,
)


def test_limit_fractions_and_moments():
    x = torch.tensor([1.0, -3.0, 300.0, -500.0, 40000.0, 3.0e38, 2.0, 0.0])
    sums, abs_max = tensor_sums(x)
    stats = summarize(sums, float(abs_max))
    assert stats["frac_near_e4m3_max"] == 4 / 8  # |x| >= 224
    assert stats["frac_near_e5m2_max"] == 2 / 8  # |x| >= 28672
    assert stats["frac_near_bf16_max"] == 1 / 8  # |x| >= 1.69e38
    assert stats["abs_max"] == pytest.approx(3.0e38, rel=1e-7)  # fp32 rounding of 3e38
    small = torch.tensor([1.0, -2.0, 3.0, 4.0], dtype=torch.bfloat16)
    stats = summarize(*[t if i == 0 else float(t) for i, t in enumerate(tensor_sums(small))])
    ref = small.double()
    assert stats["mean"] == pytest.approx(ref.mean().item())
    assert stats["std"] == pytest.approx(ref.std(unbiased=False).item())
    assert stats["rms"] == pytest.approx(ref.square().mean().sqrt().item())
    assert stats["frac_nonfinite"] == 0.0


def test_nonfinite_values_are_counted():
    x = torch.tensor([1.0, math.nan, math.inf, 2.0])
    sums, abs_max = tensor_sums(x)
    stats = summarize(sums, float(abs_max))
    assert stats["frac_nonfinite"] == 0.5
    assert math.isnan(stats["mean"]) and math.isnan(stats["std"])


def test_partial_sums_merge_exactly():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1000, generator=gen) * 3 + 1
    parts = [tensor_sums(chunk) for chunk in x.split([100, 450, 450])]
    merged = summarize(sum(p[0] for p in parts), max(float(p[1]) for p in parts))
    whole = summarize(*[t if i == 0 else float(t) for i, t in enumerate(tensor_sums(x))])
    for key in whole:
        assert merged[key] == pytest.approx(whole[key], rel=1e-12, abs=1e-15)


class _Attention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 4, bias=False)

    def forward(self, x):
        return self.proj(x), None


class _Layer(torch.nn.Module):
    """The interface ActivationStats relies on: self_attention, mlp, layer_number, (out, ctx)."""

    def __init__(self, layer_number: int):
        super().__init__()
        self.layer_number = layer_number
        self.self_attention = _Attention()
        self.mlp = _Attention()

    def forward(self, x):
        x = x + self.self_attention(x)[0]
        return x + self.mlp(x)[0], None


def _run(recompute: bool) -> dict:
    torch.manual_seed(0)
    layers = [_Layer(1), _Layer(2)]
    stats = ActivationStats(
        [(i, layer) for i, layer in enumerate(layers)], 2, True, torch.device("cpu")
    )
    stats.attach()
    x = torch.randn(3, 2, 4, requires_grad=True)
    h = x
    for layer in layers:
        if recompute:
            h = checkpoint(lambda t, layer=layer: layer(t)[0], h, use_reentrant=False)
        else:
            h = layer(h)[0]
    h.square().sum().backward()
    stats.detach()
    return reduce_layer_stats(stats.sums, stats.maxes, None)


def test_recomputation_is_not_counted_twice():
    plain, recomputed = _run(False), _run(True)
    assert plain == recomputed
    assert plain["layers"][0]["mlp"]["mean"] != 0.0
    flat = flatten_layer_stats(plain)
    assert flat["layers/residual_rms/001"] == plain["layers"][1]["residual"]["rms"]


def test_no_hooks_after_detach():
    layer = _Layer(1)
    stats = ActivationStats([(0, layer)], 1, True, torch.device("cpu"))
    stats.attach()
    assert len(layer.mlp._forward_hooks) == 1
    stats.detach()
    assert not layer.mlp._forward_hooks and not layer._forward_hooks
    layer(torch.ones(1, 1, 4))
    assert float(stats.sums.sum()) == 0.0
    silent = ActivationStats([(0, layer)], 1, False, torch.device("cpu"))
    silent.attach()  # TP rank > 0 without sequence parallelism: nothing to add
    assert not layer._forward_hooks


def test_compiled_forward_is_swapped_for_eager_while_attached():
    layer = _Layer(1)
    calls = []

    def wrapped(x):  # stands in for the torch.compile wrapper models.fast_path installs
        calls.append(1)
        return type(layer).forward(layer, x)

    layer.forward = wrapped
    stats = ActivationStats([(0, layer)], 1, True, torch.device("cpu"))
    stats.attach()
    assert "forward" not in vars(layer)
    layer(torch.ones(2, 1, 4))
    assert calls == [] and float(stats.sums[0, 2, 0]) == 8.0  # residual: 2 x 1 x 4 values
    stats.detach()
    assert layer.forward is wrapped
    layer(torch.ones(2, 1, 4))
    assert calls == [1]
