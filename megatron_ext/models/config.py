"""Model shape and numerics configuration (a Llama-style decoder)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from megatron_ext.config.errors import ProblemCollector


@dataclass(kw_only=True)
class ModelConfig:
    """A Llama-style decoder: RMSNorm, SwiGLU, RoPE, grouped-query attention, no biases."""

    num_layers: int = 4
    """Transformer layers (must divide evenly into pipeline stages x virtual chunks)."""
    hidden_size: int = 64
    """Model width."""
    ffn_hidden_size: int = 176
    """SwiGLU inner width (Llama uses about 8/3 x hidden, rounded)."""
    num_attention_heads: int = 4
    """Query heads (divisible by tensor_model_parallel_size)."""
    num_query_groups: int = 2
    """Key/value heads for grouped-query attention (equal to num_attention_heads: plain MHA)."""
    seq_length: int = 128
    """Maximum context length (the full length of the sequence-length curriculum)."""
    vocab_size: int = 4096
    """Tokenizer vocabulary (unpadded); the embedding is padded to a multiple of (below) x TP."""
    make_vocab_size_divisible_by: int = 128
    """Pad the embedding rows to a multiple of this times TP (the padding is stripped on export)."""
    rotary_base: int = 10000
    """RoPE base frequency."""
    norm_epsilon: float = 1e-5
    """RMSNorm epsilon."""
    init_method_std: float = 0.02
    """Standard deviation of the normal weight initialisation."""
    untie_embeddings_and_output_weights: bool = True
    """Separate input embedding and output projection (Llama style)."""
    attention_dropout: float = 0.0
    """Dropout on attention probabilities."""
    hidden_dropout: float = 0.0
    """Dropout on residual branches."""
    transformer_impl: Literal["auto", "transformer_engine", "local"] = "auto"
    """Layer backend: Transformer Engine when importable on a GPU (auto), else local layers."""
    attention_backend: Literal["sdpa", "unfused"] = "sdpa"
    """Local backend's core attention: fused SDPA kernels, or megatron-core's unfused reference."""
    recompute_granularity: Literal["none", "selective", "full"] = "none"
    """Activation recomputation: selective (attention core) or full layers."""
    recompute_method: Literal["uniform", "block"] = "uniform"
    """How full recomputation groups layers."""
    recompute_num_layers: int = 1
    """Layers per recomputation group (full recomputation)."""
    compile_layers: Literal["auto", "on", "off"] = "auto"
    """torch.compile each layer (fuses RMSNorm, RoPE, SwiGLU); auto: on for local layers on CUDA."""
    fused_cross_entropy: Literal["auto", "on", "off"] = "auto"
    """Chunked cross-entropy, no fp32 copy of the logits; auto: on for local layers on CUDA."""
    wgrad_fusion: Literal["auto", "on", "off"] = "off"
    """Local layers: weight-gradient GEMMs accumulate straight into DDP's fp32 main_grad (no bf16
    gradient, no separate add); auto: on for local layers on CUDA. Off by default: no clear gain
    measured on an H100 (the GEMMs with the fp32 addend take longer; docs/performance.md)."""

    def validate(self, problems: ProblemCollector, tp: int, pp: int, vpp: int | None) -> None:
        # Invalid degrees are reported by ParallelConfig; check divisibility against 1 instead.
        tp, pp, vpp = max(tp, 1), max(pp, 1), (vpp if vpp is None or vpp >= 1 else None)
        problems.check(
            self.num_attention_heads % tp == 0,
            "model.num_attention_heads",
            self.num_attention_heads,
            f"must be divisible by tensor_model_parallel_size={tp}",
            f"use a multiple of {tp} heads or a smaller TP",
        )
        problems.check(
            self.num_query_groups % tp == 0,
            "model.num_query_groups",
            self.num_query_groups,
            f"must be divisible by tensor_model_parallel_size={tp}",
            f"use a multiple of {tp} query groups or a smaller TP",
        )
        problems.check(
            self.num_query_groups > 0 and self.num_attention_heads % self.num_query_groups == 0,
            "model.num_query_groups",
            self.num_query_groups,
            f"must divide num_attention_heads={self.num_attention_heads}",
            "pick a divisor of the number of heads",
        )
        problems.check(
            self.hidden_size % self.num_attention_heads == 0,
            "model.hidden_size",
            self.hidden_size,
            f"must be divisible by num_attention_heads={self.num_attention_heads}",
            "make hidden_size a multiple of the head count",
        )
        problems.check(
            self.ffn_hidden_size % tp == 0,
            "model.ffn_hidden_size",
            self.ffn_hidden_size,
            f"must be divisible by tensor_model_parallel_size={tp}",
            f"round ffn_hidden_size to a multiple of {tp}",
        )
        chunks = pp * (vpp or 1)
        problems.check(
            self.num_layers % chunks == 0,
            "model.num_layers",
            self.num_layers,
            f"must be divisible by pipeline stages x virtual chunks = {pp} x {vpp or 1}",
            f"use a multiple of {chunks} layers or change the pipeline layout",
        )
        problems.check(
            self.vocab_size > 0,
            "model.vocab_size",
            self.vocab_size,
            "must be positive",
            "set it to the tokenizer's vocabulary size",
        )
        problems.check(
            self.make_vocab_size_divisible_by >= 1,
            "model.make_vocab_size_divisible_by",
            self.make_vocab_size_divisible_by,
            "must be at least 1",
            "use 128 (1 pads only to a multiple of TP)",
        )
        per_chunk = max(self.num_layers // chunks, 1)
        if self.recompute_granularity == "full":
            # megatron-core steps through the layers by this many: 0 never advances (a hang).
            problems.check(
                1 <= self.recompute_num_layers <= per_chunk,
                "model.recompute_num_layers",
                self.recompute_num_layers,
                f"full recomputation needs 1 to {per_chunk} layers per group (the layers of one "
                "model chunk)",
                "use 1 (every layer's input kept, the rest recomputed)",
            )

    def padded_vocab_size(self, tp: int) -> int:
        multiple = self.make_vocab_size_divisible_by * tp
        return -(-self.vocab_size // multiple) * multiple

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
"""The torch dtype of each ``PrecisionConfig.dtype`` (and of converter ``--dtype``) name."""


@dataclass(kw_only=True)
class PrecisionConfig:
    """Numerics of parameters, activations and gradients."""

    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Compute dtype; bf16/fp16 keep fp32 main weights in the optimizer."""
    initial_loss_scale: float = 4294967296.0
    """fp16 only: starting dynamic loss scale (2^32, Megatron-LM's default)."""
    min_loss_scale: float = 1.0
    """fp16 only: the scale never drops below this."""
    loss_scale_window: int = 1000
    """fp16 only: steps without overflow before the scale doubles."""
    hysteresis: int = 2
    """fp16 only: overflows tolerated before the scale halves."""
    grad_reduce_in_fp32: bool = True
    """Accumulate and all-reduce gradients in fp32 (recommended for bf16)."""
    fp8: Literal["none", "e4m3", "hybrid"] = "none"
    """FP8 GEMMs through Transformer Engine (Hopper GPUs only)."""
    fp8_recipe: Literal["delayed", "tensorwise", "blockwise", "mxfp8"] = "delayed"
    """Transformer Engine FP8 scaling recipe."""
    fp8_amax_history_len: int = 1024
    """Delayed scaling: amax history length."""
    fp8_amax_compute_algo: Literal["max", "most_recent"] = "max"
    """Delayed scaling: how the scale is derived from the amax history."""
