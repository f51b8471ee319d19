"""megatron_ext: a 3D-parallel LLM pretraining recipe on megatron-core."""

__version__ = "0.1.0"
