"""Background loading of the next steps' batches, with the consumer's wait time measured.

Which batch a step needs is known in advance (it depends only on the schedule and the stream
position), so worker threads read upcoming steps while the current one trains. The result is
the same as reading synchronously: requests are taken in order and results are handed out in
order. Reading is a memory-mapped copy plus a few numpy operations that release the GIL, so
threads suffice and nothing is pickled.

    loader = make_step_loader(stream, dp_rank=0, dp_size=1, micro_batch_size=2)
    with BatchPrefetcher(loader, requests, num_workers=1, prefetch_batches=2) as prefetcher:
        for batch in prefetcher:
            train_step(batch.micro_batches); log(data_wait_ms=batch.wait_ms)
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from megatron_ext.data.batches import BatchRequest, get_step_batch
from megatron_ext.data.token_stream import TokenStream

MicroBatches = list[dict[str, torch.Tensor]]


class DataLoadingError(RuntimeError):
    """Reading a batch failed in a background worker; the message names the step."""


@dataclass
class PrefetchedBatch:
    """One step's micro-batches and how long the consumer waited for them (milliseconds)."""

    request: BatchRequest
    micro_batches: MicroBatches
    wait_ms: float


def make_step_loader(
    stream: TokenStream,
    *,
    dp_rank: int,
    dp_size: int,
    micro_batch_size: int,
    eod_mask_loss: bool = False,
    reset_position_ids: bool = False,
) -> Callable[[BatchRequest], MicroBatches]:
    """A function that reads this rank's micro-batches for a ``BatchRequest``."""

    def load(request: BatchRequest) -> MicroBatches:
        return get_step_batch(
            stream,
            request.consumed_tokens,
            request.global_batch_size,
            request.seq_length,
            dp_rank,
            dp_size,
            micro_batch_size,
            eod_mask_loss=eod_mask_loss,
            reset_position_ids=reset_position_ids,
        )

    return load


def to_device(micro_batch: dict[str, torch.Tensor], device: torch.device | str) -> dict:
    """Copy a micro-batch to ``device``; non-blocking when the source is pinned."""
    return {k: v.to(device, non_blocking=True) for k, v in micro_batch.items()}


class BatchPrefetcher:
    """Ordered, bounded read-ahead of step batches on ``num_workers`` threads.

    ``num_workers=0`` reads in the caller (the wait then is the whole read time).
    ``prefetch_batches`` bounds how many steps are in flight or ready.
    ``pin_memory=None`` pins when CUDA is available.
    """

    def __init__(
        self,
        load: Callable[[BatchRequest], MicroBatches],
        requests: Iterable[BatchRequest],
        *,
        num_workers: int = 1,
        prefetch_batches: int = 2,
        pin_memory: bool | None = None,
    ) -> None:
        if num_workers < 0 or prefetch_batches < 1:
            raise ValueError(
                f"num_workers={num_workers} must be >= 0 and prefetch_batches={prefetch_batches} "
                ">= 1"
            )
        self._load = load
        self._requests: Iterator[BatchRequest] = iter(requests)
        self._pin = torch.cuda.is_available() if pin_memory is None else pin_memory
        self._depth = prefetch_batches
        self._pending: collections.deque[tuple[BatchRequest, Future]] = collections.deque()
        self._executor = (
            ThreadPoolExecutor(num_workers, thread_name_prefix="batch-prefetch")
            if num_workers > 0
            else None
        )
        self._closed = False
        self._fill()

    def _prepare(self, request: BatchRequest) -> MicroBatches:
        micro_batches = self._load(request)
        if self._pin:
            micro_batches = [{k: v.pin_memory() for k, v in mb.items()} for mb in micro_batches]
        return micro_batches

    def _fill(self) -> None:
        if self._executor is None:
            return
        while len(self._pending) < self._depth:
            request = next(self._requests, None)
            if request is None:
                return
            self._pending.append((request, self._executor.submit(self._prepare, request)))

    def next(self) -> PrefetchedBatch:
        """The next step's batch; raises StopIteration when the requests are exhausted."""
        if self._closed:
            raise RuntimeError("BatchPrefetcher is closed")
        began = time.perf_counter()
        if self._executor is None:
            request = next(self._requests, None)
            if request is None:
                raise StopIteration
            result = self._run(request, lambda: self._prepare(request))
        else:
            if not self._pending:
                raise StopIteration
            request, future = self._pending.popleft()
            result = self._run(request, future.result)
            self._fill()
        wait_ms = (time.perf_counter() - began) * 1000.0
        return PrefetchedBatch(request=request, micro_batches=result, wait_ms=wait_ms)

    def _run(self, request: BatchRequest, get: Callable[[], MicroBatches]) -> MicroBatches:
        try:
            return get()
        except Exception as exc:
            self.close()
            raise DataLoadingError(
                f"reading the batch of step {request.step} failed (consumed_tokens="
                f"{request.consumed_tokens}, global_batch_size={request.global_batch_size}, "
                f"seq_length={request.seq_length}): {type(exc).__name__}: {exc}"
            ) from exc

    def __iter__(self) -> Iterator[PrefetchedBatch]:
        return self

    def __next__(self) -> PrefetchedBatch:
        return self.next()

    def close(self) -> None:
        """Cancel what has not started, wait for running reads, release the threads."""
        if self._closed:
            return
        self._closed = True
        for _, future in self._pending:
            future.cancel()
        self._pending.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> BatchPrefetcher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
