"""Model FLOPs per token of the Llama-style decoder, peak FLOP/s by GPU type, and MFU.

The count follows Megatron-LM's convention (``num_floating_point_operations`` in its training.py):
only matrix multiplications, 2 FLOPs per multiply-add, and backward = 2 x forward, so a weight
matrix of ``m x n`` costs ``6 * m * n`` FLOPs per token. Per token and layer (h hidden, n query
heads, g key/value groups, d head dim, F SwiGLU width, s sequence length, V padded vocabulary):

    QKV projection        h * (n + 2 g) * d
    attention scores      n * d * s          (Q K^T against all s keys)
    attention x values    n * d * s
    output projection     n * d * h
    SwiGLU MLP            3 * h * F          (gate, up, down)

plus the output layer ``h * V`` once (tied or not); embedding lookups, norms, softmax and RoPE are
not counted. Megatron counts the attention terms over all ``s`` keys although a causal mask makes
half of them unnecessary; ``FlopsBreakdown.causal_total`` gives the count with the attention terms
halved. MFU here uses Megatron's (full) count, so it is comparable with Megatron-LM's TFLOP/s.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from megatron_ext.models.config import ModelConfig

# Dense (no sparsity) bf16/fp16 tensor-core peaks from the vendor data sheets, in FLOP/s. The first
# pattern that matches torch.cuda.get_device_name() wins, so specific variants come first.
PEAK_BF16_FLOPS: list[tuple[str, float]] = [
    (r"GH200", 989.4e12),
    (r"H200", 989.4e12),
    (r"H100.*PCIe", 756.0e12),
    (r"H100.*NVL", 835.0e12),
    (r"H100", 989.4e12),  # SXM5 / HBM3
    (r"H800", 989.4e12),
    (r"B200", 2250.0e12),
    (r"A100", 312.0e12),
    (r"A800", 312.0e12),
    (r"L40S", 362.05e12),
    (r"\bL4\b", 121.0e12),
]


@dataclass(frozen=True)
class FlopsBreakdown:
    """Training FLOPs (forward + backward) per token, split into dense and attention parts."""

    dense: float
    """Weight matmuls of all layers plus the output layer."""
    attention: float
    """Q K^T and attention x V over the full sequence (Megatron's convention)."""

    @property
    def total(self) -> float:
        """Megatron-LM's count: what MFU and TFLOP/s use."""
        return self.dense + self.attention

    @property
    def causal_total(self) -> float:
        """The count when the causal mask's skipped half of the attention is not counted."""
        return self.dense + self.attention / 2


def flops_breakdown(
    model_cfg: ModelConfig, seq_length: int, vocab_size: int | None = None
) -> FlopsBreakdown:
    """Training FLOPs per token at ``seq_length``; ``vocab_size`` defaults to the TP=1 padding."""
    h = model_cfg.hidden_size
    d = model_cfg.head_dim
    n = model_cfg.num_attention_heads
    g = model_cfg.num_query_groups
    vocab = vocab_size if vocab_size is not None else model_cfg.padded_vocab_size(1)
    per_layer_weights = h * (n + 2 * g) * d + n * d * h + 3 * h * model_cfg.ffn_hidden_size
    weights = model_cfg.num_layers * per_layer_weights + h * vocab
    attention_macs = model_cfg.num_layers * 2 * n * d * seq_length
    return FlopsBreakdown(dense=6.0 * weights, attention=6.0 * attention_macs)


def model_flops_per_token(
    model_cfg: ModelConfig, seq_length: int, vocab_size: int | None = None
) -> float:
    """Megatron-convention training FLOPs per token (see the module docstring)."""
    return flops_breakdown(model_cfg, seq_length, vocab_size).total


def lookup_peak_flops(device_name: str) -> float | None:
    """Dense bf16 peak FLOP/s for a GPU name, or None when it is not in the table."""
    for pattern, flops in PEAK_BF16_FLOPS:
        if re.search(pattern, device_name):
            return flops
    return None


def detect_peak_flops(device: str) -> tuple[float | None, str]:
    """(peak FLOP/s or None, device name) of this process's accelerator; CPU gives None."""
    if device != "cuda":
        return None, "cpu"
    import torch

    name = torch.cuda.get_device_name()
    return lookup_peak_flops(name), name


def mfu(
    flops_per_token: float, tokens_per_s: float, num_gpus: int, peak_flops_per_gpu: float
) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s per GPU over the per-GPU peak (0..1)."""
    if num_gpus <= 0 or peak_flops_per_gpu <= 0:
        raise ValueError("num_gpus and peak_flops_per_gpu must be positive")
    return flops_per_token * tokens_per_s / num_gpus / peak_flops_per_gpu
