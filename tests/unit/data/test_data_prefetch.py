"""Background batch loading: same batches as synchronous reads, wait time, errors, shutdown."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from megatron_ext.data.batches import BatchRequest
from megatron_ext.data.prefetch import (
    BatchPrefetcher,
    DataLoadingError,
    make_step_loader,
    to_device,
)
from megatron_ext.data.token_stream import DocumentSource, TokenStream

pytestmark = pytest.mark.timeout(120)


def _requests() -> list[BatchRequest]:
    """A curriculum-like sequence: growing lengths, exact positions."""
    requests, position = [], 0
    for step, (batch, length) in enumerate([(8, 16), (8, 16), (4, 32), (4, 32), (4, 64)] * 2):
        requests.append(BatchRequest(position, batch, length, step=step))
        position += batch * length
    return requests


@pytest.mark.parametrize("num_workers,depth", [(0, 1), (1, 2), (3, 4)])
def test_prefetched_batches_equal_synchronous_reads(two_datasets, num_workers, depth):
    prefix_a, prefix_b, _, _ = two_datasets
    stream = TokenStream([DocumentSource(prefix_a), DocumentSource(prefix_b)], seed=2)
    load = make_step_loader(stream, dp_rank=1, dp_size=2, micro_batch_size=2)
    expected = [load(r) for r in _requests()]
    with BatchPrefetcher(
        load, iter(_requests()), num_workers=num_workers, prefetch_batches=depth
    ) as prefetcher:
        got = list(prefetcher)
    assert [b.request for b in got] == _requests()
    for batch, micro_batches in zip(got, expected):
        assert isinstance(batch.wait_ms, float) and batch.wait_ms >= 0.0
        assert len(batch.micro_batches) == len(micro_batches)
        for a, b in zip(batch.micro_batches, micro_batches):
            assert all(torch.equal(a[k], b[k]) for k in b)


def test_wait_time_is_measured_and_reading_runs_ahead_boundedly():
    calls = []

    def slow_load(request: BatchRequest):
        calls.append(request.step)
        time.sleep(0.05)
        return [{"tokens": torch.full((1, 2), request.step)}]

    requests = [BatchRequest(0, 1, 2, step=i) for i in range(6)]
    with BatchPrefetcher(slow_load, requests[:3], num_workers=0) as prefetcher:
        waits = [b.wait_ms for b in prefetcher]
    assert all(w >= 45.0 for w in waits)  # synchronous: the step waits for the whole read
    calls.clear()
    with BatchPrefetcher(slow_load, requests, num_workers=1, prefetch_batches=2) as prefetcher:
        first = prefetcher.next()
        assert first.micro_batches[0]["tokens"][0, 0] == 0 and first.wait_ms >= 0.0
        deadline = time.monotonic() + 30.0
        while len(calls) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)
        # Steps 1 and 2 were read ahead while the consumer was busy, and no further.
        assert calls == [0, 1, 2]
        assert [prefetcher.next().request.step for _ in range(5)] == [1, 2, 3, 4, 5]


def test_worker_errors_reach_the_consumer_with_the_step():
    def failing_load(request: BatchRequest):
        if request.step == 2:
            raise OSError("disk went away")
        return [{"tokens": torch.zeros(1, 1)}]

    requests = [BatchRequest(i * 10, 1, 10, step=i) for i in range(5)]
    prefetcher = BatchPrefetcher(failing_load, requests, num_workers=2, prefetch_batches=3)
    assert [prefetcher.next().request.step for _ in range(2)] == [0, 1]
    with pytest.raises(DataLoadingError, match=r"step 2 failed \(consumed_tokens=20.*disk went"):
        prefetcher.next()
    with pytest.raises(RuntimeError, match="closed"):
        prefetcher.next()


def test_close_stops_worker_threads():
    before = {t.ident for t in threading.enumerate()}
    requests = (BatchRequest(i, 1, 1, step=i) for i in range(10**9))  # endless plan
    prefetcher = BatchPrefetcher(
        lambda r: [{"tokens": torch.zeros(1, 1)}], requests, num_workers=2, prefetch_batches=4
    )
    prefetcher.next()
    prefetcher.close()
    prefetcher.close()
    leftover = [
        t for t in threading.enumerate() if t.ident not in before and t.name.startswith("batch")
    ]
    assert leftover == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_batches_are_pinned_and_copied_without_blocking_on_gpu(two_datasets):
    prefix_a, prefix_b, _, _ = two_datasets
    stream = TokenStream([DocumentSource(prefix_a), DocumentSource(prefix_b)], seed=2)
    load = make_step_loader(stream, dp_rank=0, dp_size=1, micro_batch_size=2)
    with BatchPrefetcher(load, _requests()[:3], num_workers=1) as prefetcher:
        for batch, expected in zip(prefetcher, (load(r) for r in _requests()[:3])):
            for mb, ref in zip(batch.micro_batches, expected):
                assert all(t.is_pinned() for t in mb.values())
                on_gpu = to_device(mb, "cuda")
                torch.cuda.synchronize()
                assert all(torch.equal(on_gpu[k].cpu(), ref[k]) for k in ref)
