"""The SDPA core attention equals a plain softmax(QK^T / sqrt(d)) V reference (causal, GQA)."""

from __future__ import annotations

import math

import pytest
import torch
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_ext.models.attention import SDPACoreAttention


def _reference(q, k, v, causal: bool):
    """[s, b, h, d] inputs; key/value heads repeated per query group; float64."""
    s, b, heads, d = q.shape
    groups = k.shape[2]
    k = k.repeat_interleave(heads // groups, dim=2)
    v = v.repeat_interleave(heads // groups, dim=2)
    q, k, v = (t.double().permute(1, 2, 0, 3) for t in (q, k, v))  # [b, h, s, d]
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    if causal:
        future = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1)
        scores = scores.masked_fill(future, float("-inf"))
    out = torch.softmax(scores, dim=-1) @ v
    return out.permute(2, 0, 1, 3).reshape(s, b, heads * d)


def _attention(heads: int, groups: int, d: int, mask_type: AttnMaskType) -> SDPACoreAttention:
    config = TransformerConfig(
        num_layers=1,
        hidden_size=heads * d,
        num_attention_heads=heads,
        num_query_groups=groups,
        kv_channels=d,
        use_cpu_initialization=True,
        attention_dropout=0.0,
    )
    return SDPACoreAttention(config, 1, mask_type, "self")


def _inputs(heads: int, groups: int, d: int, s: int, b: int, seed: int):
    """Query ``[s, b, heads, d]``, key and value ``[s, b, groups, d]``."""
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(s, b, heads, d, generator=generator)
    k = torch.randn(s, b, groups, d, generator=generator)
    v = torch.randn(s, b, groups, d, generator=generator)
    return q, k, v


@pytest.mark.parametrize("heads,groups", [(8, 2), (4, 4), (6, 1)])
def test_sdpa_matches_reference_causal_gqa(heads, groups):
    d, s, b = 16, 24, 3
    attention = _attention(heads, groups, d, AttnMaskType.causal)
    q, k, v = _inputs(heads, groups, d, s, b, seed=heads * 10 + groups)
    out = attention(q, k, v, attention_mask=None)
    expected = _reference(q, k, v, causal=True)
    assert out.shape == (s, b, heads * d)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    # Causality: changing the last position leaves every earlier output unchanged.
    k2, v2 = k.clone(), v.clone()
    k2[-1] += 1.0
    v2[-1] -= 1.0
    out2 = attention(q, k2, v2, attention_mask=None)
    torch.testing.assert_close(out2[:-1], out[:-1])
    assert not torch.allclose(out2[-1], out[-1])


def test_explicit_mask_uses_megatron_convention():
    """megatron-core masks are True where attention is forbidden."""
    heads, groups, d, s, b = 4, 2, 8, 10, 2
    attention = _attention(heads, groups, d, AttnMaskType.padding)
    q, k, v = _inputs(heads, groups, d, s, b, seed=7)
    causal_mask = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1).expand(b, 1, s, s)
    out = attention(q, k, v, attention_mask=causal_mask)
    torch.testing.assert_close(out.double(), _reference(q, k, v, causal=True), rtol=1e-5, atol=1e-5)
