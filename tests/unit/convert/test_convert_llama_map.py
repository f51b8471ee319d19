"""The key map and tensor transforms between megatron-core and Hugging Face Llama."""

from __future__ import annotations

import pytest
import torch

from megatron_ext.convert import llama
from megatron_ext.convert.from_hf import choose_vocab_multiple
from megatron_ext.models.config import ModelConfig


def _labelled(rows: int, label: float) -> torch.Tensor:
    """Rows whose values say where they came from: label + row / 1000, 3 columns."""
    return (label + torch.arange(rows, dtype=torch.float64) / 1000)[:, None].repeat(1, 3)


@pytest.mark.parametrize("num_heads,num_groups", [(4, 2), (8, 2), (4, 4), (6, 1)])
def test_convert_split_qkv_follows_query_group_interleaving(num_heads, num_groups):
    hd = 2
    shape = llama.AttentionShape(num_heads, num_groups, hd)
    q, k, v = (
        _labelled(num_heads * hd, 1),
        _labelled(num_groups * hd, 2),
        _labelled(num_groups * hd, 3),
    )
    # The fused layout written out by hand: per group, its query heads, then its k and v head.
    r = num_heads // num_groups
    rows = []
    for g in range(num_groups):
        rows += [q[(g * r + j) * hd : (g * r + j + 1) * hd] for j in range(r)]
        rows += [k[g * hd : (g + 1) * hd], v[g * hd : (g + 1) * hd]]
    fused = torch.cat(rows)
    got_q, got_k, got_v = llama.split_qkv(fused, shape)
    assert torch.equal(got_q, q) and torch.equal(got_k, k) and torch.equal(got_v, v)
    assert torch.equal(llama.merge_qkv(q, k, v, shape), fused)


def test_convert_split_qkv_rejects_wrong_row_count():
    with pytest.raises(ValueError, match="expected"):
        llama.split_qkv(torch.zeros(10, 4), llama.AttentionShape(4, 2, 2))
    with pytest.raises(ValueError, match="k_proj"):
        llama.merge_qkv(
            torch.zeros(8, 4), torch.zeros(2, 4), torch.zeros(4, 4), llama.AttentionShape(4, 2, 2)
        )


def test_convert_fc1_is_gate_then_up():
    gate, up = _labelled(5, 1), _labelled(5, 2)
    fused = llama.merge_fc1(gate, up)
    got_gate, got_up = llama.split_fc1(fused, 5)
    assert torch.equal(got_gate, gate) and torch.equal(got_up, up)
    with pytest.raises(ValueError, match="2 \\* ffn_hidden_size"):
        llama.split_fc1(fused, 4)


def test_convert_layer_roundtrip_and_norm_offset():
    model = ModelConfig(
        num_layers=1,
        hidden_size=8,
        ffn_hidden_size=12,
        num_attention_heads=4,
        num_query_groups=2,
        vocab_size=10,
    )
    gen = torch.Generator().manual_seed(0)
    stored = {
        llama.QKV_NORM: torch.rand(8, generator=gen),
        llama.QKV: torch.rand(16, 8, generator=gen),
        llama.PROJ: torch.rand(8, 8, generator=gen),
        llama.FC1_NORM: torch.rand(8, generator=gen),
        llama.FC1: torch.rand(24, 8, generator=gen),
        llama.FC2: torch.rand(8, 12, generator=gen),
    }
    hf = llama.megatron_layer_to_hf(stored, 0, model)
    assert set(hf) == {f"model.layers.0.{n}" for n in llama.HF_LAYER_NAMES}
    back = llama.hf_layer_to_megatron(hf, 0, model)
    assert all(torch.equal(back[k], stored[k]) for k in stored)
    shifted = llama.megatron_layer_to_hf(stored, 0, model, norm_offset=1.0)
    assert torch.equal(shifted["model.layers.0.input_layernorm.weight"], stored[llama.QKV_NORM] + 1)


def test_convert_hf_config_roundtrips_model_config():
    from transformers import LlamaConfig

    model = ModelConfig(
        num_layers=3,
        hidden_size=48,
        ffn_hidden_size=128,
        num_attention_heads=6,
        num_query_groups=2,
        seq_length=256,
        vocab_size=1000,
        rotary_base=500000,
        norm_epsilon=1e-6,
        init_method_std=0.01,
        untie_embeddings_and_output_weights=False,
    )
    hf = LlamaConfig(**llama.hf_config_dict(model, "bfloat16", 1, 2, None))
    again = llama.model_config_from_hf(hf.to_dict())
    for field in (
        "num_layers",
        "hidden_size",
        "ffn_hidden_size",
        "num_attention_heads",
        "num_query_groups",
        "seq_length",
        "vocab_size",
        "rotary_base",
        "norm_epsilon",
        "init_method_std",
        "untie_embeddings_and_output_weights",
    ):
        assert getattr(again, field) == getattr(model, field), field


# A minimal Llama config.json: no rope_theta, head_dim, num_key_value_heads or biases.
SMALL_HF_CONFIG = {
    "model_type": "llama",
    "hidden_size": 32,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "intermediate_size": 64,
    "vocab_size": 100,
}


def test_convert_model_config_reads_old_style_rope_theta():
    config = {**SMALL_HF_CONFIG, "rope_theta": 1000000.0, "max_position_embeddings": 128}
    model = llama.model_config_from_hf(config, seq_length=64)
    assert model.rotary_base == 1000000 and model.seq_length == 64 and model.num_query_groups == 4


@pytest.mark.parametrize(
    "change,message",
    [
        ({"model_type": "mistral"}, "only 'llama'"),
        ({"attention_bias": True}, "attention_bias"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "llama3"),
        ({"head_dim": 16}, "head_dim"),
        ({"num_hidden_layers": None}, "num_hidden_layers"),
    ],
)
def test_convert_refuses_unsupported_hf_configs(change, message):
    config = {**SMALL_HF_CONFIG, **change}
    if change.get("num_hidden_layers", 0) is None:
        del config["num_hidden_layers"]
    with pytest.raises(ValueError, match=message):
        llama.model_config_from_hf(config)


@pytest.mark.parametrize(
    "vocab,tp,multiple",
    [
        (500, 2, 2),
        (32000, 1, 128),
        (32000, 8, 32),
        (128256, 2, 128),
        (128256, 4, 64),
        (501, 2, 1),  # padded to 502: one zero row, the fewest TP2 allows
    ],
)
def test_convert_vocab_multiple_avoids_padding_when_possible(vocab, tp, multiple):
    assert choose_vocab_multiple(vocab, tp) == multiple
    padded = ModelConfig(vocab_size=vocab, make_vocab_size_divisible_by=multiple).padded_vocab_size(
        tp
    )
    assert (padded == vocab) == (vocab % tp == 0)
