"""Every generator is captured and restored exactly."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from megatron_ext.checkpoint.rng import capture_rng_state, restore_rng_state


@pytest.fixture
def tracker():
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    from megatron_ext.parallel.cpu_compat import install_cpu_compat, uninstall_cpu_compat

    install_cpu_compat()
    tracker = get_cuda_rng_tracker()
    tracker.reset()
    tracker.add("model-parallel-rng", 4242)
    yield tracker
    tracker.reset()
    uninstall_cpu_compat()


def _draw(tracker) -> tuple:
    with tracker.fork("model-parallel-rng"):
        forked = torch.rand(4)
    return random.random(), float(np.random.rand()), torch.rand(4), forked


def test_capture_then_restore_replays_every_generator(tracker):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    state = capture_rng_state("cpu")
    first = _draw(tracker)
    second = _draw(tracker)
    assert first[0] != second[0] and not torch.equal(first[3], second[3])
    restore_rng_state(state, "cpu")
    replay = _draw(tracker)
    assert replay[:2] == first[:2]
    assert torch.equal(replay[2], first[2])
    assert torch.equal(replay[3], first[3])


def test_restored_state_is_a_copy(tracker):
    state = capture_rng_state("cpu")
    _draw(tracker)
    again = capture_rng_state("cpu")
    assert not torch.equal(
        state["tracker"]["model-parallel-rng"], again["tracker"]["model-parallel-rng"]
    )


def test_cuda_state_required_on_gpu(tracker):
    state = capture_rng_state("cpu")
    assert state["cuda"] is None
    with pytest.raises(ValueError, match="no CUDA generator"):
        restore_rng_state(state, "cuda")
