"""Hugging Face ``LlamaForCausalLM`` <-> megatron-core ``GPTModel``: key map, tensor transforms.

Stored (``torch_dist``) megatron-core tensors are full-shape and independent of the TP/PP layout
that wrote them; decoder weights are stacked on a leading layer axis. Per layer:

====================================================  ==========================================
megatron-core (``decoder.layers.`` + ...)              Hugging Face (``model.layers.{i}.`` + ...)
====================================================  ==========================================
``self_attention.linear_qkv.layer_norm_weight``       ``input_layernorm.weight``
``self_attention.linear_qkv.weight``                   ``self_attn.{q,k,v}_proj.weight``
``self_attention.linear_proj.weight``                  ``self_attn.o_proj.weight``
``mlp.linear_fc1.layer_norm_weight``                   ``post_attention_layernorm.weight``
``mlp.linear_fc1.weight``                              ``mlp.{gate,up}_proj.weight``
``mlp.linear_fc2.weight``                              ``mlp.down_proj.weight``
====================================================  ==========================================

plus ``embedding.word_embeddings.weight`` -> ``model.embed_tokens.weight`` (padded vocabulary rows
stripped), ``decoder.final_layernorm.weight`` -> ``model.norm.weight`` and ``output_layer.weight``
-> ``lm_head.weight`` (absent with tied embeddings).

Two layouts need care:

- The fused QKV rows are grouped per key/value head: for group ``g`` the ``r = nq / ng`` query heads
  ``g*r .. g*r+r-1``, then key head ``g``, then value head ``g``, each ``head_dim`` rows. A TP shard
  is a contiguous run of whole groups, so the stored tensor has this order whatever the TP degree.
- The SwiGLU ``linear_fc1`` is stored as ``[gate; up]`` over the full FFN width. In memory each TP
  rank holds ``[gate_r; up_r]``; megatron-core's SwiGLU sharded factory saves the gate halves of all
  ranks first and the up halves after them, so the stored tensor is layout independent.

RoPE uses the same rotate-half convention in both (no permutation of Q/K rows).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_ext.models.config import ModelConfig

EMBEDDING = "embedding.word_embeddings.weight"
FINAL_NORM = "decoder.final_layernorm.weight"
OUTPUT_LAYER = "output_layer.weight"
QKV_NORM = "decoder.layers.self_attention.linear_qkv.layer_norm_weight"
QKV = "decoder.layers.self_attention.linear_qkv.weight"
PROJ = "decoder.layers.self_attention.linear_proj.weight"
FC1_NORM = "decoder.layers.mlp.linear_fc1.layer_norm_weight"
FC1 = "decoder.layers.mlp.linear_fc1.weight"
FC2 = "decoder.layers.mlp.linear_fc2.weight"
LAYER_KEYS = (QKV_NORM, QKV, PROJ, FC1_NORM, FC1, FC2)

HF_EMBEDDING = "model.embed_tokens.weight"
HF_FINAL_NORM = "model.norm.weight"
HF_LM_HEAD = "lm_head.weight"
HF_LAYER_NAMES = (
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
)


@dataclass(frozen=True)
class AttentionShape:
    """Head counts of grouped-query attention."""

    num_heads: int
    num_groups: int
    head_dim: int

    @classmethod
    def of(cls, model: ModelConfig) -> AttentionShape:
        return cls(model.num_attention_heads, model.num_query_groups, model.head_dim)

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_groups

    @property
    def qkv_rows(self) -> int:
        return (self.num_heads + 2 * self.num_groups) * self.head_dim


def hf_layer_prefix(layer: int) -> str:
    return f"model.layers.{layer}."


def split_qkv(qkv: torch.Tensor, shape: AttentionShape) -> tuple[torch.Tensor, ...]:
    """Fused ``[(nq + 2 ng) hd, H]`` -> ``q [nq hd, H]``, ``k [ng hd, H]``, ``v [ng hd, H]``."""
    if qkv.shape[0] != shape.qkv_rows:
        raise ValueError(
            f"fused QKV has {qkv.shape[0]} rows, expected (heads + 2 * groups) * head_dim = "
            f"{shape.qkv_rows}"
        )
    r, hd = shape.heads_per_group, shape.head_dim
    grouped = qkv.reshape(shape.num_groups, (r + 2) * hd, -1)
    q = grouped[:, : r * hd].reshape(shape.num_heads * hd, -1)
    k = grouped[:, r * hd : (r + 1) * hd].reshape(shape.num_groups * hd, -1)
    v = grouped[:, (r + 1) * hd :].reshape(shape.num_groups * hd, -1)
    return q.contiguous(), k.contiguous(), v.contiguous()


def merge_qkv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shape: AttentionShape
) -> torch.Tensor:
    """Inverse of ``split_qkv``: interleave query heads with their key/value head per group."""
    r, hd, ng = shape.heads_per_group, shape.head_dim, shape.num_groups
    expected = {"q": shape.num_heads * hd, "k": ng * hd, "v": ng * hd}
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        if tensor.shape[0] != expected[name]:
            raise ValueError(f"{name}_proj has {tensor.shape[0]} rows, expected {expected[name]}")
    hidden = q.shape[1]
    grouped = torch.cat(
        [q.reshape(ng, r * hd, hidden), k.reshape(ng, hd, hidden), v.reshape(ng, hd, hidden)],
        dim=1,
    )
    return grouped.reshape(shape.qkv_rows, hidden)


def split_fc1(fc1: torch.Tensor, ffn_hidden_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stored ``[gate; up]`` ``[2F, H]`` -> ``gate [F, H]``, ``up [F, H]``."""
    if fc1.shape[0] != 2 * ffn_hidden_size:
        raise ValueError(
            f"linear_fc1 has {fc1.shape[0]} rows, expected 2 * ffn_hidden_size = "
            f"{2 * ffn_hidden_size}"
        )
    return fc1[:ffn_hidden_size].contiguous(), fc1[ffn_hidden_size:].contiguous()


def merge_fc1(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    if gate.shape != up.shape:
        raise ValueError(f"gate_proj {tuple(gate.shape)} and up_proj {tuple(up.shape)} differ")
    return torch.cat([gate, up], dim=0)


def megatron_layer_to_hf(
    stored: dict[str, torch.Tensor], layer: int, model: ModelConfig, norm_offset: float = 0.0
) -> dict[str, torch.Tensor]:
    """One layer's stored tensors (``LAYER_KEYS``, layer axis removed) as HF tensors.

    ``norm_offset`` is added to norm weights (1.0 for ``apply_layernorm_1p``, which stores gamma-1).
    """
    q, k, v = split_qkv(stored[QKV], AttentionShape.of(model))
    gate, up = split_fc1(stored[FC1], model.ffn_hidden_size)
    prefix = hf_layer_prefix(layer)
    return {
        prefix + "self_attn.q_proj.weight": q,
        prefix + "self_attn.k_proj.weight": k,
        prefix + "self_attn.v_proj.weight": v,
        prefix + "self_attn.o_proj.weight": stored[PROJ],
        prefix + "mlp.gate_proj.weight": gate,
        prefix + "mlp.up_proj.weight": up,
        prefix + "mlp.down_proj.weight": stored[FC2],
        prefix + "input_layernorm.weight": _offset(stored[QKV_NORM], norm_offset),
        prefix + "post_attention_layernorm.weight": _offset(stored[FC1_NORM], norm_offset),
    }


def hf_layer_to_megatron(
    hf: dict[str, torch.Tensor], layer: int, model: ModelConfig
) -> dict[str, torch.Tensor]:
    """One HF layer as the megatron-core tensors of that layer (``LAYER_KEYS``, no layer axis)."""
    prefix = hf_layer_prefix(layer)
    get = lambda name: hf[prefix + name]  # noqa: E731
    return {
        QKV_NORM: get("input_layernorm.weight"),
        QKV: merge_qkv(
            get("self_attn.q_proj.weight"),
            get("self_attn.k_proj.weight"),
            get("self_attn.v_proj.weight"),
            AttentionShape.of(model),
        ),
        PROJ: get("self_attn.o_proj.weight"),
        FC1_NORM: get("post_attention_layernorm.weight"),
        FC1: merge_fc1(get("mlp.gate_proj.weight"), get("mlp.up_proj.weight")),
        FC2: get("mlp.down_proj.weight"),
    }


def hf_tensor_shapes(model: ModelConfig) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of the HF model, in the order the exporter writes them."""
    h, f, hd = model.hidden_size, model.ffn_hidden_size, model.head_dim
    nq, ng = model.num_attention_heads, model.num_query_groups
    per_layer = {
        "self_attn.q_proj.weight": (nq * hd, h),
        "self_attn.k_proj.weight": (ng * hd, h),
        "self_attn.v_proj.weight": (ng * hd, h),
        "self_attn.o_proj.weight": (h, nq * hd),
        "mlp.gate_proj.weight": (f, h),
        "mlp.up_proj.weight": (f, h),
        "mlp.down_proj.weight": (h, f),
        "input_layernorm.weight": (h,),
        "post_attention_layernorm.weight": (h,),
    }
    shapes = [(HF_EMBEDDING, (model.vocab_size, h))]
    for layer in range(model.num_layers):
        shapes += [(hf_layer_prefix(layer) + name, shape) for name, shape in per_layer.items()]
    shapes.append((HF_FINAL_NORM, (h,)))
    if model.untie_embeddings_and_output_weights:
        shapes.append((HF_LM_HEAD, (model.vocab_size, h)))
    return shapes


def hf_config_dict(
    model: ModelConfig,
    torch_dtype: str,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> dict:
    """The ``LlamaConfig`` keyword arguments of the model (``transformers`` writes config.json)."""
    return dict(
        vocab_size=model.vocab_size,
        hidden_size=model.hidden_size,
        intermediate_size=model.ffn_hidden_size,
        num_hidden_layers=model.num_layers,
        num_attention_heads=model.num_attention_heads,
        num_key_value_heads=model.num_query_groups,
        head_dim=model.head_dim,
        hidden_act="silu",
        max_position_embeddings=model.seq_length,
        initializer_range=model.init_method_std,
        rms_norm_eps=model.norm_epsilon,
        tie_word_embeddings=not model.untie_embeddings_and_output_weights,
        rope_theta=float(model.rotary_base),
        attention_bias=False,
        mlp_bias=False,
        attention_dropout=0.0,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        torch_dtype=torch_dtype,
    )


def model_config_from_hf(config: dict, seq_length: int | None = None) -> ModelConfig:
    """The ``ModelConfig`` of a HF ``config.json`` dict; refuses what the builder cannot build."""
    required = (
        "num_hidden_layers",
        "hidden_size",
        "intermediate_size",
        "num_attention_heads",
        "vocab_size",
    )
    missing = [key for key in required if not isinstance(config.get(key), int)]
    if missing:
        raise ValueError(f"config.json lacks integer fields {missing}")
    problems = []
    arch = config.get("model_type")
    if arch != "llama":
        problems.append(f"model_type is {arch!r}; only 'llama' checkpoints are converted")
    if config.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={config.get('hidden_act')!r} (only SwiGLU with silu)")
    for flag in ("attention_bias", "mlp_bias"):
        if config.get(flag):
            problems.append(f"{flag}=true (megatron_ext models have no biases)")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        problems.append(f"RoPE scaling {rope_type!r} (only plain RoPE is supported)")
    heads = config["num_attention_heads"]
    hidden = config["hidden_size"]
    head_dim = config.get("head_dim") or hidden // heads
    if head_dim * heads != hidden:
        problems.append(
            f"head_dim={head_dim} x num_attention_heads={heads} != hidden_size={hidden} "
            "(megatron_ext derives head_dim from hidden_size)"
        )
    if problems:
        raise ValueError("cannot convert this Hugging Face model: " + "; ".join(problems))
    theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    if float(theta) != int(theta):
        raise ValueError(f"rope_theta={theta} is not an integer; ModelConfig.rotary_base is an int")
    return ModelConfig(
        num_layers=config["num_hidden_layers"],
        hidden_size=hidden,
        ffn_hidden_size=config["intermediate_size"],
        num_attention_heads=heads,
        num_query_groups=config.get("num_key_value_heads") or heads,
        seq_length=seq_length or config.get("max_position_embeddings", 2048),
        vocab_size=config["vocab_size"],
        rotary_base=int(theta),
        norm_epsilon=config.get("rms_norm_eps", 1e-6),
        init_method_std=config.get("initializer_range", 0.02),
        untie_embeddings_and_output_weights=not config.get("tie_word_embeddings", False),
    )


def _offset(weight: torch.Tensor, offset: float) -> torch.Tensor:
    return weight + offset if offset else weight
