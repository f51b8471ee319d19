"""Layer specs: which megatron-core modules make up a transformer layer.

Two backends. ``transformer_engine`` (TE's fused LayerNorm+Linear, FP8-capable GEMMs and fused
attention) is used when TE imports and a GPU is present. ``local`` uses megatron-core's own
tensor-parallel linear layers with torch RMSNorm, our SDPA core attention in place of
megatron-core's unfused ``DotProductAttention`` (which materialises ``[b, heads, s, s]``), and
our subclasses of megatron-core's parallel linear layers (``linear``: a compiled layer is one graph,
and the weight gradient can go straight into DDP's ``main_grad``).
Both produce the same parameter names in checkpoints (megatron-core maps the local norms onto TE's
fused ``layer_norm_weight`` keys); TE layers also store FP8 metadata (``_extra_state``).
"""

from __future__ import annotations

import importlib.util

from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_ext.models.attention import SDPACoreAttention
from megatron_ext.models.linear import LocalColumnParallelLinear, LocalRowParallelLinear
from megatron_ext.models.norm import RMSNorm


def transformer_engine_available() -> bool:
    """True when Transformer Engine's PyTorch extension imports (it needs CUDA)."""
    if importlib.util.find_spec("transformer_engine") is None:
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except (ImportError, OSError, RuntimeError):
        return False
    return True


def resolve_backend(transformer_impl: str, device: str) -> str:
    """``auto`` -> ``transformer_engine`` on a GPU with TE installed, else ``local``."""
    if transformer_impl == "auto":
        return (
            "transformer_engine" if device == "cuda" and transformer_engine_available() else "local"
        )
    if transformer_impl == "transformer_engine":
        if device != "cuda":
            raise ValueError("model.transformer_impl=transformer_engine needs a CUDA device")
        if not transformer_engine_available():
            raise ValueError(
                "model.transformer_impl=transformer_engine but Transformer Engine is not "
                "importable; "
                "install requirements-gpu.txt or use model.transformer_impl=local"
            )
    return transformer_impl


def get_layer_spec(backend: str, attention_backend: str = "sdpa") -> ModuleSpec:
    """The transformer-layer spec for a Llama-style decoder on the chosen backend."""
    if backend == "transformer_engine":
        from megatron.core.models.gpt.gpt_layer_specs import (
            get_gpt_layer_with_transformer_engine_spec,
        )

        return get_gpt_layer_with_transformer_engine_spec()
    if backend != "local":
        raise ValueError(f"unknown layer backend {backend!r}")
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    spec.submodules.input_layernorm = RMSNorm
    spec.submodules.pre_mlp_layernorm = RMSNorm
    attention, mlp = spec.submodules.self_attention.submodules, spec.submodules.mlp.submodules
    attention.linear_qkv, attention.linear_proj = LocalColumnParallelLinear, LocalRowParallelLinear
    mlp.linear_fc1, mlp.linear_fc2 = LocalColumnParallelLinear, LocalRowParallelLinear
    if attention_backend == "sdpa":
        spec.submodules.self_attention.submodules.core_attention = SDPACoreAttention
    elif attention_backend != "unfused":
        raise ValueError(f"unknown attention backend {attention_backend!r}")
    return spec


def get_block_spec(layer_spec: ModuleSpec, backend: str, config, vp_stage: int | None):
    """The decoder-block spec of this pipeline stage: its layers and the final norm.

    Passing a block spec (rather than a layer spec) lets the local backend use our RMSNorm for
    the final norm too, instead of megatron-core's torch fallback that refuses sequence parallel.
    """
    if backend == "transformer_engine":
        return layer_spec
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )

    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[layer_spec] * num_layers, layer_norm=RMSNorm)
