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

import math
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


def _layer_activations(
    model: ModelConfig, parallel: ParallelConfig, layers: int, sbh: int
) -> tuple[float, float]:
    """Bytes of one micro-batch's activations kept by a stage's ``layers`` transformer layers,
    and the extra bytes live while a recomputed group runs again in the backward.

    A layer keeps ``34 s b h / tp`` bytes with sequence parallelism, else ``(10 + 24 / tp) s b h``
    (Korthikanti et al. with flash attention: no ``[s, s]`` scores; selective recomputation of
    the attention core saves nothing more here). Full recomputation keeps only the input of each
    checkpointed group, ``2 s b h`` bytes, split over TP with sequence parallelism. ``uniform``
    checkpoints groups of ``recompute_num_layers`` layers in every model chunk and recomputes a
    whole group at once; ``block`` checkpoints only the first ``recompute_num_layers`` layers of
    each chunk, one by one, and the others keep all their activations.
    """
    tp = parallel.tensor_model_parallel_size
    if parallel.sequence_parallel:
        full_layer = sbh * 34 / tp
    else:
        full_layer = sbh * (10 + 24 / tp)
    if model.recompute_granularity != "full":
        return full_layer * layers, 0.0
    layer_input = 2 * sbh / (tp if parallel.sequence_parallel else 1)
    chunks = parallel.virtual_pipeline_model_parallel_size or 1
    per_chunk = max(layers // chunks, 1)
    group = min(max(model.recompute_num_layers, 1), per_chunk)
    if model.recompute_method == "uniform":
        kept = chunks * math.ceil(per_chunk / group) * layer_input
        return kept, group * full_layer
    kept = chunks * (group * layer_input + (per_chunk - group) * full_layer)
    return kept, full_layer


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
    per_microbatch, recompute_working_set = _layer_activations(
        model, parallel, layers, seq_length * micro_batch_size * model.hidden_size
    )
    s, b, h = seq_length, micro_batch_size, model.hidden_size
    estimates = []
    for stage in range(pp):
        params = layers * (sharded // tp + replicated)
        activations = per_microbatch * (pp - stage) + recompute_working_set
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
