"""Batches by stream position: layout independence, shifted labels, masks, batch arithmetic."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_ext.config.errors import ConfigError
from megatron_ext.data.batches import get_eval_batches, get_step_batch, num_microbatches
from megatron_ext.data.token_stream import DocumentSource, TokenStream

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def stream(two_datasets):
    prefix_a, prefix_b, _, _ = two_datasets
    return TokenStream([DocumentSource(prefix_a), DocumentSource(prefix_b)], [0.4, 0.6], seed=11)


def _global_step(stream, start, batch, length, dp_size, micro, **options):
    """All ranks' micro-batches concatenated in rank order: the step's global batch."""
    rows = {key: [] for key in ("tokens", "labels", "loss_mask", "position_ids")}
    for rank in range(dp_size):
        for mb in get_step_batch(stream, start, batch, length, rank, dp_size, micro, **options):
            assert mb["tokens"].shape == (micro, length)
            for key in rows:
                rows[key].append(mb[key])
    return {key: torch.cat(value) for key, value in rows.items()}


@pytest.mark.parametrize("start", [0, 12_345, 10**8 + 7])
def test_same_sequences_for_every_data_parallel_layout(stream, start):
    # global batch 8: DP1 x M4 (micro 2), DP4 x M1 (micro 2), DP2 x M2 (micro 2), DP8 x M1.
    reference = _global_step(stream, start, 8, 32, dp_size=1, micro=2)
    for dp_size, micro in ((4, 2), (2, 2), (8, 1), (1, 8)):
        other = _global_step(stream, start, 8, 32, dp_size=dp_size, micro=micro)
        for key in reference:
            assert torch.equal(reference[key], other[key]), (dp_size, micro, key)
    assert len(get_step_batch(stream, start, 8, 32, 0, 1, 2)) == 4
    assert len(get_step_batch(stream, start, 8, 32, 3, 4, 2)) == 1


def test_sequences_are_consecutive_stream_windows(stream):
    start, batch, length = 1000, 6, 16
    step = _global_step(stream, start, batch, length, dp_size=3, micro=1)
    for k in range(batch):
        window = stream.read(start + k * length, length + 1)
        assert step["tokens"][k].tolist() == window[:-1].tolist()
        assert step["labels"][k].tolist() == window[1:].tolist()
        assert step["tokens"].dtype == torch.int64 and step["loss_mask"].dtype == torch.float32
    # Consecutive sequences share one token; the next step continues at start + G*L.
    assert torch.equal(step["labels"][:-1, -1], step["tokens"][1:, 0])
    following = _global_step(stream, start + batch * length, batch, length, dp_size=1, micro=6)
    assert following["tokens"][0, 0] == step["labels"][-1, -1]
    assert torch.equal(step["position_ids"][0], torch.arange(length))
    assert torch.all(step["loss_mask"] == 1.0)


def test_eod_loss_mask_and_position_reset(make_dataset):
    docs = [np.array([5, 6, 7]), np.array([8, 9]), np.array([3, 4, 2, 1])]
    source = DocumentSource(make_dataset("eod", docs), append_eod=True, eod_token_id=0)
    stream = TokenStream([source], shuffle=False, eod_token_id=0)
    (mb,) = get_step_batch(stream, 0, 1, 8, 0, 1, 1, eod_mask_loss=True, reset_position_ids=True)
    assert mb["tokens"][0].tolist() == [5, 6, 7, 0, 8, 9, 0, 3]
    assert mb["labels"][0].tolist() == [6, 7, 0, 8, 9, 0, 3, 4]
    assert mb["loss_mask"][0].tolist() == [1, 1, 1, 0, 1, 1, 0, 1]
    assert mb["position_ids"][0].tolist() == [0, 1, 2, 3, 0, 1, 2, 0]
    no_eod = TokenStream([source], shuffle=False)
    with pytest.raises(ValueError, match="eod_token_id"):
        get_step_batch(no_eod, 0, 1, 8, 0, 1, 1, eod_mask_loss=True)


def test_eval_batches_are_fixed(stream):
    first = get_eval_batches(stream, 2, 4, 16, 1, 2, 1)
    second = get_eval_batches(stream, 2, 4, 16, 1, 2, 1)
    assert len(first) == 2 and len(first[0]) == 2
    for a, b in zip(first, second):
        for mb_a, mb_b in zip(a, b):
            assert all(torch.equal(mb_a[k], mb_b[k]) for k in mb_a)
    # Batch 1 continues where batch 0 ended.
    assert first[1][0]["tokens"][0].tolist() == stream.read(4 * 16 + 2 * 16, 16).tolist()


def test_batch_arithmetic_and_its_error():
    assert num_microbatches(2048, 1, 8) == 256
    assert num_microbatches(2048, 4, 512) == 1
    with pytest.raises(ConfigError) as info:
        num_microbatches(2048, 3, 8)
    message = str(info.value)
    assert info.value.fields() == ["schedule.global_batch_size"]
    assert "micro_batch_size*data_parallel_size=3*8=24" in message
    assert "2040, 2064" in message and "micro_batch_size in {1, 2}" in message
    with pytest.raises(ConfigError, match="global_batch_size"):
        num_microbatches(8, 2, 8)
    with pytest.raises(ValueError, match="dp_rank"):
        get_step_batch(None, 0, 8, 4, 2, 2, 1)
