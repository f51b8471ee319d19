"""Core attention on ``torch.nn.functional.scaled_dot_product_attention``.

Plugs into the ``core_attention`` slot of megatron-core's ``SelfAttention`` spec. SDPA dispatches to
the flash / memory-efficient / cuDNN fused kernels on H100, so the ``[b, heads, s, s]`` score matrix
of megatron-core's local ``DotProductAttention`` is never materialised. Grouped-query attention is
handled by SDPA itself (``enable_gqa``), without repeating key/value heads in memory.

Shapes (megatron-core is sequence-first): query ``[sq, b, heads_per_tp, head_dim]``, key and value
``[sk, b, groups_per_tp, head_dim]``; output ``[sq, b, heads_per_tp * head_dim]``.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import get_cuda_rng_tracker
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


class SDPACoreAttention(MegatronModule):
    """Causal (or padded/arbitrary-mask) attention through PyTorch's fused SDPA kernels."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError(
                "SDPA core attention does not implement context parallelism; use the Transformer "
                "Engine backend (model.transformer_impl=transformer_engine) for "
                "context_parallel_size > 1"
            )
        self.attn_mask_type = attn_mask_type
        self.layer_number = layer_number
        head_dim = config.kv_channels
        self.softmax_scale = (
            softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        )
        self.dropout_p = (
            config.attention_dropout if attention_dropout is None else attention_dropout
        )
        # From the config rather than the key's shape: under torch.compile with dynamic shapes a
        # shape comparison is symbolic, which SDPA's boolean argument refuses (a graph break).
        groups = config.num_query_groups or config.num_attention_heads
        self.enable_gqa = groups != config.num_attention_heads

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if packed_seq_params is not None:
            raise ValueError("packed sequences need the Transformer Engine attention backend")
        if attention_bias is not None:
            raise ValueError("attention_bias is not supported by SDPA core attention")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        sq, b, heads, head_dim = query.shape
        # [s, b, h, d] -> [b, h, s, d]
        q = query.permute(1, 2, 0, 3)
        k = key.permute(1, 2, 0, 3)
        v = value.permute(1, 2, 0, 3)
        is_causal = mask_type == AttnMaskType.causal and attention_mask is None
        mask = None
        if not is_causal and attention_mask is not None:
            # megatron-core masks are True where attention is *not* allowed; SDPA's the opposite.
            mask = ~attention_mask
        dropout_p = self.dropout_p if self.training else 0.0
        # Attention heads differ across TP ranks, so dropout draws from the model-parallel RNG.
        rng = get_cuda_rng_tracker().fork() if dropout_p > 0 else contextlib.nullcontext()
        with rng:
            context = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=mask,
                dropout_p=dropout_p,
                is_causal=is_causal,
                scale=self.softmax_scale,
                enable_gqa=self.enable_gqa,
            )
        # [b, h, s, d] -> [s, b, h*d]
        return context.permute(2, 0, 1, 3).reshape(sq, b, heads * head_dim)
