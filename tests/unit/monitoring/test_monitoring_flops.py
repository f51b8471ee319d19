"""FLOPs per token against a hand count, the peak table, and MFU arithmetic."""

from __future__ import annotations

import pytest

from megatron_ext.models.config import ModelConfig
from megatron_ext.monitoring.flops import (
    flops_breakdown,
    lookup_peak_flops,
    mfu,
    model_flops_per_token,
)

# L=2, h=8, 2 query heads of d=4, 1 KV group, SwiGLU F=12, vocabulary 16, s=10.
SHAPE = ModelConfig(
    num_layers=2,
    hidden_size=8,
    num_attention_heads=2,
    num_query_groups=1,
    ffn_hidden_size=12,
    vocab_size=16,
    make_vocab_size_divisible_by=16,
)


def test_hand_count():
    # Multiply-adds per token and layer:
    #   QKV 8 x (2*4 + 2*1*4) = 128, output projection 8 x 8 = 64, SwiGLU 3 x 8 x 12 = 288 -> 480
    #   x 2 layers = 960, output layer 8 x 16 = 128 -> 1088 weight MACs -> x 6 = 6528 FLOPs.
    #   Attention: Q K^T 2*4*10 = 80 and A V 80 per layer -> 160 x 2 layers = 320 MACs -> 1920.
    breakdown = flops_breakdown(SHAPE, seq_length=10)
    assert breakdown.dense == 6528
    assert breakdown.attention == 1920
    assert breakdown.total == 8448 == model_flops_per_token(SHAPE, 10)
    assert breakdown.causal_total == 6528 + 960


def test_matches_megatron_closed_form():
    # Megatron-LM: 12 L h^2 [(1 + g/n + s/h) + 1.5 F/h] + 6 h V per token (SwiGLU, GQA).
    cfg = ModelConfig(
        num_layers=22,
        hidden_size=2048,
        num_attention_heads=32,
        num_query_groups=4,
        ffn_hidden_size=5632,
        vocab_size=32000,
    )
    s, h, L = 4096, 2048, 22
    closed = 12 * L * h * h * ((1 + 4 / 32 + s / h) + 1.5 * 5632 / h) + 6 * h * 32000
    assert model_flops_per_token(cfg, s) == pytest.approx(closed, rel=1e-12)
    # The padded vocabulary of the run is what Megatron counts.
    assert model_flops_per_token(cfg, s, vocab_size=32768) - model_flops_per_token(cfg, s) == (
        6 * h * 768
    )


def test_peak_table():
    assert lookup_peak_flops("NVIDIA H100 80GB HBM3") == 989.4e12
    assert lookup_peak_flops("NVIDIA H100 PCIe") == 756e12
    assert lookup_peak_flops("NVIDIA H100 NVL") == 835e12
    assert lookup_peak_flops("NVIDIA H200") == 989.4e12
    assert lookup_peak_flops("NVIDIA GH200 480GB") == 989.4e12
    assert lookup_peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert lookup_peak_flops("NVIDIA L40S") == 362.05e12
    assert lookup_peak_flops("NVIDIA L4") == 121e12
    assert lookup_peak_flops("Tesla T4") is None


def test_mfu_and_tokens():
    # 8 GPUs, 1e6 tokens/s at 6e9 FLOPs/token = 6e15 FLOP/s -> 7.5e14 per GPU of 1e15 peak.
    assert mfu(6e9, 1e6, 8, 1e15) == pytest.approx(0.75)
    with pytest.raises(ValueError):
        mfu(6e9, 1e6, 0, 1e15)
