"""Capture and restore every random generator a training process draws from.

A process draws from Python's ``random``, NumPy's global generator, torch's CPU generator, the
CUDA generator of its device (on GPU) and megatron-core's model-parallel RNG tracker (the forked
CUDA states behind tensor-parallel dropout and initialisation). Restoring all of them on the same
rank of the same layout makes a resumed run draw exactly what the uninterrupted run would have.

On another layout there is no rank to inherit a state from; ``reseed_rng`` then derives every
generator from the run's seed and the step, so the resumed run is reproducible, though not equal
to the original.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def capture_rng_state(device: str) -> dict[str, Any]:
    """The state of every generator of this process (``device``: ``cpu`` or ``cuda``)."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch_cpu": torch.get_rng_state(),
        # On CPU the "CUDA" generator megatron-core forks is the CPU one (see cpu_compat).
        "cuda": torch.cuda.get_rng_state() if device == "cuda" else None,
        "tracker": {k: v.clone() for k, v in get_cuda_rng_tracker().get_states().items()},
    }


def restore_rng_state(state: dict[str, Any], device: str) -> None:
    """Put back what ``capture_rng_state`` returned."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch_cpu"])
    if device == "cuda":
        if state["cuda"] is None:
            raise ValueError("the checkpoint's RNG state has no CUDA generator (saved on CPU)")
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states({k: v.clone() for k, v in state["tracker"].items()})


def reseed_rng(seed: int, step: int, rank: int) -> int:
    """Seed every generator from ``(seed, step, rank)``; returns the derived base seed.

    The tracker is seeded as at start-up (megatron-core offsets each tensor-parallel rank), so
    ranks of one tensor-parallel group still draw different dropout masks.
    """
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    base = (seed * 1_000_003 + step) % (2**31 - 1)
    per_rank = (base + 7919 * rank) % (2**31 - 1)
    random.seed(per_rank)
    np.random.seed(per_rank)
    torch.manual_seed(base)
    model_parallel_cuda_manual_seed(base)
    return base
