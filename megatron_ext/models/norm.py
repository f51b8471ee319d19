"""RMSNorm for the local backend that works with sequence parallelism.

megatron-core's local spec falls back to ``torch.nn.RMSNorm`` without apex, which refuses sequence
parallelism: with SP every TP rank normalises a different slice of the sequence, so the norm's
weight gradient is partial on each rank and must be summed across the TP group. megatron-core does
that for every parameter flagged ``sequence_parallel``; this module sets the flag.

The arithmetic follows Llama's reference (and Hugging Face's ``LlamaRMSNorm``): normalise in fp32,
cast back to the input dtype, then scale, so exported models reproduce the same logits.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_config import TransformerConfig


class RMSNorm(torch.nn.Module):
    """``weight * x / sqrt(mean(x^2) + eps)`` over the hidden dimension."""

    def __init__(
        self,
        config: TransformerConfig,
        hidden_size: int,
        eps: float = 1e-5,
        **unused_megatron_kwargs,
    ):
        super().__init__()
        if config.layernorm_zero_centered_gamma:
            raise ValueError("zero-centred gamma (apply_layernorm_1p) is not supported by RMSNorm")
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        # megatron-core all-reduces the grads of flagged parameters across the TP group.
        self.weight.sequence_parallel = config.sequence_parallel

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        x = hidden_states.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(input_dtype)
