"""A single-process megatron-core model on CPU, for writing converted checkpoints and checking them.

``single_process_megatron()`` starts a world of one (gloo, TP1 x PP1) and tears it down again,
restoring the environment variables and the CPU compatibility layer it found, so that it can run
inside a larger program (a test session, a notebook). ``load_checkpoint_model`` builds the model of
a checkpoint at TP1 and loads its weights through ``dist_checkpointing`` (resharding from whatever
layout wrote it); ``greedy_generate`` decodes with a full forward pass per token.

    with single_process_megatron():
        model, model_cfg = load_checkpoint_model("runs/demo")
        tokens = greedy_generate(model, prompt_ids, num_tokens=32, vocab_size=4096)
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_ext.models.config import ModelConfig, PrecisionConfig
from megatron_ext.parallel.config import ParallelConfig

_ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@contextlib.contextmanager
def single_process_megatron(seed: int = 1234) -> Iterator[None]:
    """Run the body in a one-process megatron-core world on CPU (not inside a distributed job)."""
    if dist.is_available() and dist.is_initialized():
        raise ValueError(
            "a process group already exists; run the conversion outside a distributed job"
        )
    from megatron_ext.parallel.cpu_compat import is_cpu_compat_installed, uninstall_cpu_compat
    from megatron_ext.parallel.init import destroy_parallel, initialize_parallel
    from megatron_ext.parallel.ports import find_free_port

    saved_env = {key: os.environ.get(key) for key in _ENV_KEYS}
    had_compat = is_cpu_compat_installed()
    os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(find_free_port())
    try:
        initialize_parallel(ParallelConfig(device="cpu"), seed=seed)
        yield
    finally:
        destroy_parallel()
        if not had_compat:
            uninstall_cpu_compat()
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def build_single_model(model: ModelConfig, padded_vocab_size: int) -> torch.nn.Module:
    """The whole model at TP1 x PP1 in fp32 with exactly ``padded_vocab_size`` embedding rows."""
    from megatron_ext.models.builder import build_model

    if padded_vocab_size < model.vocab_size:
        raise ValueError(f"padded vocabulary {padded_vocab_size} < vocab_size {model.vocab_size}")
    # At TP1 the padding multiple is make_vocab_size_divisible_by itself: pick it so that the
    # embedding has exactly the rows of the checkpoint (whatever TP padded it).
    sized = replace(model, make_vocab_size_divisible_by=padded_vocab_size, transformer_impl="local")
    (chunk,) = build_model(
        sized, ParallelConfig(device="cpu"), PrecisionConfig(dtype="fp32"), "cpu"
    )
    return chunk


def load_checkpoint_model(
    checkpoint: str | os.PathLike, iteration: int | None = None
) -> tuple[torch.nn.Module, ModelConfig]:
    """A checkpoint's model at TP1 with its weights (call inside ``single_process_megatron``)."""
    from megatron.core import dist_checkpointing

    from megatron_ext.convert import llama
    from megatron_ext.convert.dist_reader import DistCheckpointReader, resolve_checkpoint_dir
    from megatron_ext.convert.run_files import read_config, run_model
    from megatron_ext.convert.to_hf import find_model_prefix

    ckpt_dir = resolve_checkpoint_dir(checkpoint, iteration)
    config, path = read_config(ckpt_dir)
    model_cfg = run_model(config, path).config
    reader = DistCheckpointReader(ckpt_dir)
    prefix = find_model_prefix(reader)
    padded = reader.shape(prefix + llama.EMBEDDING)[0]
    chunk = build_single_model(model_cfg, padded)
    state = dist_checkpointing.load(chunk.sharded_state_dict(prefix=prefix), str(ckpt_dir))
    # The result also holds the checkpoint's common (non-tensor) state, e.g. the optimizer's.
    own = set(chunk.state_dict())
    chunk.load_state_dict({k: v for k, v in _strip_prefix(state, prefix).items() if k in own})
    chunk.eval()
    return chunk, model_cfg


def save_checkpoint_model(chunk: torch.nn.Module, checkpoint_dir: Path) -> None:
    """Save a TP1 model's weights as a ``torch_dist`` checkpoint (layout-independent)."""
    from megatron.core import dist_checkpointing

    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(chunk.sharded_state_dict(), str(checkpoint_dir))


@torch.no_grad()
def logits(chunk: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """``[b, s, padded_vocab]`` fp32 logits of a TP1 model (causal, positions 0..s-1)."""
    batch, length = tokens.shape
    position_ids = torch.arange(length).unsqueeze(0).expand(batch, length)
    return chunk(input_ids=tokens, position_ids=position_ids, attention_mask=None).float()


@torch.no_grad()
def greedy_generate(
    chunk: torch.nn.Module, prompt: torch.Tensor, num_tokens: int, vocab_size: int
) -> torch.Tensor:
    """Append ``num_tokens`` argmax tokens to ``prompt`` ``[b, s]``, recomputing the whole prefix.

    Only the first ``vocab_size`` logits compete: the padded rows of the embedding are not tokens.
    """
    tokens = prompt
    for _ in range(num_tokens):
        step = logits(chunk, tokens)[:, -1, :vocab_size]
        tokens = torch.cat([tokens, step.argmax(dim=-1, keepdim=True)], dim=1)
    return tokens


def _strip_prefix(state: dict, prefix: str) -> dict:
    if not prefix:
        return state
    return {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in state.items()}
