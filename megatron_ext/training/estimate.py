"""Analytic parameter counts and per-GPU memory estimates for a dry run.

Parameters of the Llama-style decoder (no biases), with V the padded vocabulary, H the hidden
size, F the SwiGLU width, q/g the query heads and key/value groups, d the head size:

* per layer: ``H*(q+2g)*d`` (fused QKV) + ``q*d*H`` (output projection) + ``2*F*H`` (gate and up)
  + ``F*H`` (down) + ``2*H`` (two RMSNorms);
* first stage: the ``V*H`` input embedding; last stage: the final norm ``H`` and, untied, the
  ``V*H`` output layer.

Matrices are split across TP; norms are replicated. Memory per GPU (bytes) is

* weights: parameters x (2 for bf16/fp16, 4 for fp32);
* gradients: parameters x 4 (fp32 main gradients in megatron-core's DDP buffers; 2 if reduced in
  bf16);
* optimizer: parameters x (4 fp32 main weights when not fp32 + 8 Adam moments), divided by the
  data-parallel size with the distributed optimizer;
* activations (Korthikanti et al., 2022, with fused attention so no ``s x s`` scores are kept):
  ``s*b*H*34/TP`` bytes per layer in 16-bit, (``/TP`` over everything with sequence parallel,
  otherwise ``10`` of the 34 stay replicated), plus the ``s*b*V*4/TP`` fp32 logits on the last
  stage. Selective recomputation changes nothing here because SDPA already avoids the scores;
  full recomputation keeps only the ``2*s*b*H`` layer inputs. With 1F1B the first stage holds
  ``PP`` micro-batches in flight (the interleaved schedule a little more; ignored).

It is an estimate for planning (the allocator's fragmentation and workspace come on top), not a
measurement.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_ext.models.config import ModelConfig, PrecisionConfig
from megatron_ext.parallel.config import ParallelConfig

GIB = 1024**3


@dataclass(frozen=True)
class StageEstimate:
    """Parameter count and memory estimate of one pipeline stage, per GPU."""

    stage: int
    num_layers: int
    params_per_gpu: int
    weights_gib: float
    grads_gib: float
    optimizer_gib: float
    activations_gib: float

    @property
    def total_gib(self) -> float:
        return self.weights_gib + self.grads_gib + self.optimizer_gib + self.activations_gib


def layer_params(model: ModelConfig) -> tuple[int, int]:
    """(TP-sharded, replicated) parameter counts of one transformer layer."""
    h, d = model.hidden_size, model.head_dim
    q, g, f = model.num_attention_heads, model.num_query_groups, model.ffn_hidden_size
    sharded = h * (q + 2 * g) * d + q * d * h + 3 * f * h
    return sharded, 2 * h


def total_params(model: ModelConfig, tp: int = 1) -> int:
    """All parameters of the model (with the vocabulary padded for ``tp``)."""
    vocab = model.padded_vocab_size(tp)
    sharded, replicated = layer_params(model)
    embeddings = vocab * model.hidden_size * (2 if model.untie_embeddings_and_output_weights else 1)
    return model.num_layers * (sharded + replicated) + embeddings + model.hidden_size


def estimate_stages(
    model: ModelConfig,
    parallel: ParallelConfig,
    precision: PrecisionConfig,
    world_size: int,
    micro_batch_size: int,
    seq_length: int,
) -> list[StageEstimate]:
    """One estimate per pipeline stage (a GPU of each stage)."""
    tp = parallel.tensor_model_parallel_size
    pp = parallel.pipeline_model_parallel_size
    dp = max(1, world_size // (tp * pp * parallel.context_parallel_size))
    vocab = model.padded_vocab_size(tp)
    layers = model.num_layers // pp
    sharded, replicated = layer_params(model)
    weight_bytes = 4 if precision.dtype == "fp32" else 2
    grad_bytes = 4 if precision.grad_reduce_in_fp32 or precision.dtype == "fp32" else 2
    optim_bytes = 8 + (0 if precision.dtype == "fp32" else 4)
    optim_shards = dp if parallel.use_distributed_optimizer else 1
    s, b, h = seq_length, micro_batch_size, model.hidden_size
    if model.recompute_granularity == "full":
        per_layer_act = 2 * s * b * h
    elif parallel.sequence_parallel:
        per_layer_act = s * b * h * 34 / tp
    else:
        per_layer_act = s * b * h * (10 + 24 / tp)
    estimates = []
    for stage in range(pp):
        params = layers * (sharded // tp + replicated)
        activations = per_layer_act * layers * (pp - stage)
        if stage == 0:
            params += vocab * h // tp
        if stage == pp - 1:
            params += h
            if model.untie_embeddings_and_output_weights or pp > 1:
                params += vocab * h // tp
            activations += s * b * vocab * 4 / tp
        estimates.append(
            StageEstimate(
                stage=stage,
                num_layers=layers,
                params_per_gpu=params,
                weights_gib=params * weight_bytes / GIB,
                grads_gib=params * grad_bytes / GIB,
                optimizer_gib=params * optim_bytes / optim_shards / GIB,
                activations_gib=activations / GIB,
            )
        )
    return estimates
