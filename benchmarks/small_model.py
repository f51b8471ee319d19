"""The Llama shape of the one-process micro-benchmarks, chosen on the command line.

Used by ``monitoring_overhead.py`` and ``checkpoint_save.py`` (run as scripts, which puts this
folder on ``sys.path``): the same arguments and the same derived shape (64-wide heads, half as
many key/value groups, a SwiGLU width of 8/3 of the hidden size rounded down to a multiple of 8).
"""

from __future__ import annotations

import argparse

from megatron_ext.models.config import ModelConfig


def add_model_arguments(
    parser: argparse.ArgumentParser, hidden_size: int, num_layers: int, micro_batch_size: int
) -> None:
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--hidden-size", type=int, default=hidden_size)
    parser.add_argument("--num-layers", type=int, default=num_layers)
    parser.add_argument("--seq-length", type=int, default=128)
    parser.add_argument("--micro-batch-size", type=int, default=micro_batch_size)


def model_config(args: argparse.Namespace, vocab_size: int, **fields) -> ModelConfig:
    heads = max(2, args.hidden_size // 64)
    return ModelConfig(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        ffn_hidden_size=args.hidden_size * 8 // 3 // 8 * 8,
        num_attention_heads=heads,
        num_query_groups=heads // 2 if heads % 2 == 0 else heads,
        seq_length=args.seq_length,
        vocab_size=vocab_size,
        **fields,
    )
