"""Hugging Face <-> megatron_ext checkpoint conversion (Llama architecture); see docs/convert.md."""
