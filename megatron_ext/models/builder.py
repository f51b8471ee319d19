"""The one place that turns megatron_ext configs into megatron-core objects and builds the model.

``build_transformer_config`` is the only translation of our config fields into megatron-core's
``TransformerConfig``; ``build_model`` returns this rank's model chunks (one per virtual pipeline
stage) of a Llama-style ``GPTModel``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_ext.models.config import TORCH_DTYPES, ModelConfig, PrecisionConfig
from megatron_ext.models.fast_path import apply_fast_path, resolve_fast_path
from megatron_ext.models.fused_loss import ChunkedLossGPTModel
from megatron_ext.models.specs import get_block_spec, get_layer_spec, resolve_backend
from megatron_ext.parallel.config import ParallelConfig
from megatron_ext.parallel.init import pipeline_stage_ends


def build_transformer_config(
    model: ModelConfig,
    parallel: ParallelConfig,
    precision: PrecisionConfig,
    device: str,
) -> TransformerConfig:
    """Translate megatron_ext's model, parallel and precision settings for megatron-core."""
    backend = resolve_backend(model.transformer_impl, device)
    dtype = TORCH_DTYPES[precision.dtype]
    on_gpu = device == "cuda"
    recompute = None if model.recompute_granularity == "none" else model.recompute_granularity
    fp8_kwargs = {}
    if precision.fp8 != "none":
        if backend != "transformer_engine":
            raise ValueError(
                "precision.fp8 needs Transformer Engine on a Hopper-class GPU; it is not available "
                "here (set precision.fp8=none)"
            )
        major, _ = torch.cuda.get_device_capability()
        if major < 9:
            raise ValueError("precision.fp8 needs a Hopper-class GPU (compute capability >= 9.0)")
        if precision.fp8_recipe == "mxfp8" and major < 10:
            raise ValueError(
                "precision.fp8_recipe=mxfp8 needs a Blackwell-class GPU (compute capability >= "
                "10.0); on Hopper use delayed, tensorwise or blockwise"
            )
        fp8_kwargs = dict(
            fp8=precision.fp8,
            fp8_recipe=precision.fp8_recipe,
            fp8_amax_history_len=precision.fp8_amax_history_len,
            fp8_amax_compute_algo=precision.fp8_amax_compute_algo,
        )
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        kv_channels=model.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        attention_dropout=model.attention_dropout,
        hidden_dropout=model.hidden_dropout,
        init_method_std=model.init_method_std,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
        context_parallel_size=parallel.context_parallel_size,
        sequence_parallel=parallel.sequence_parallel,
        pipeline_dtype=dtype,
        params_dtype=dtype,
        bf16=precision.dtype == "bf16",
        fp16=precision.dtype == "fp16",
        autocast_dtype=dtype,
        # Fusions that need apex / TE / CUDA kernels are on only where those exist.
        bias_activation_fusion=False,
        bias_dropout_fusion=on_gpu,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=backend == "transformer_engine",
        gradient_accumulation_fusion=gradient_accumulation_fusion(backend),
        cross_entropy_loss_fusion=False,
        use_cpu_initialization=not on_gpu,
        recompute_granularity=recompute,
        recompute_method=model.recompute_method if recompute == "full" else None,
        recompute_num_layers=model.recompute_num_layers if recompute == "full" else None,
        # Freeing a sent activation early is safe on CUDA streams, but gloo's isend still reads
        # the buffer from its own thread after the call returns.
        deallocate_pipeline_outputs=on_gpu,
        # Batched p2p posts each rank's sends and receives in one fixed order; with gloo and two
        # stages (the interleaved schedule sends both ways to the same peer) the activation and
        # the gradient then arrive in each other's buffers. Per-op p2p orders them by rank parity.
        batch_p2p_comm=on_gpu,
        **fp8_kwargs,
    )


def gradient_accumulation_fusion(backend: str) -> bool:
    """megatron-core's weight-gradient accumulation fusion: with TE layers, and only where apex's
    ``fused_weight_gradient_mlp_cuda`` is built, since the output layer is megatron-core's own
    ``ColumnParallelLinear``, which refuses the setting without it (TE alone is not enough)."""
    from megatron.core.tensor_parallel import layers

    return backend == "transformer_engine" and layers._grad_accum_fusion_available


def build_model(
    model: ModelConfig,
    parallel: ParallelConfig,
    precision: PrecisionConfig,
    device: str,
) -> list[GPTModel]:
    """Build this rank's model chunks (``virtual_pipeline_model_parallel_size`` of them, or one)."""
    config = build_transformer_config(model, parallel, precision, device)
    backend = resolve_backend(model.transformer_impl, device)
    spec = get_layer_spec(backend, model.attention_backend)
    fast_path = resolve_fast_path(model, backend, device)
    model_class = ChunkedLossGPTModel if fast_path.fused_cross_entropy else GPTModel
    num_chunks = parallel.virtual_pipeline_model_parallel_size or 1
    vocab = model.padded_vocab_size(parallel.tensor_model_parallel_size)
    chunks = []
    for vp_stage in range(num_chunks):
        vp = vp_stage if parallel.virtual_pipeline_model_parallel_size else None
        first_stage, last_stage = pipeline_stage_ends(vp)
        chunk = model_class(
            config=config,
            transformer_layer_spec=get_block_spec(spec, backend, config, vp),
            vocab_size=vocab,
            max_sequence_length=model.seq_length,
            pre_process=first_stage,
            post_process=last_stage,
            share_embeddings_and_output_weights=not model.untie_embeddings_and_output_weights,
            position_embedding_type="rope",
            rotary_base=model.rotary_base,
            vp_stage=vp,
        )
        chunk.to(
            device=torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else "cpu"
        )
        chunks.append(chunk)
    apply_fast_path(chunks, fast_path)
    return chunks


def count_parameters(chunks: list[torch.nn.Module]) -> int:
    """Parameters held by this rank (TP-sharded tensors count their local shard)."""
    return sum(p.numel() for chunk in chunks for p in chunk.parameters())
