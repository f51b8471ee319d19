"""Checkpoint saves that write their files while training goes on (``checkpoint.async_save``).

A save has a blocking part and a writing part. The blocking part is the same as for a synchronous
save: every rank builds its sharded state (the distributed optimizer gathers its state), rank 0
writes ``common.pt``, the ranks agree on the save plan, and each rank's tensors are staged to host
memory (copied from the GPU; on CPU, megatron-core copies the parameter views and the fork below
keeps the rest as it was). Then each rank forks a writer process that writes its ``.distcp``
files, and training continues. The writing part ends in
a *finalization*, a collective step run by every rank at a step boundary once every rank's writer
has exited: the write results are gathered, rank 0 writes the tensor index and our own files,
verifies the directory and only then renames it into place and updates ``latest``. A crash before
that leaves ``latest`` on the previous checkpoint, exactly as for a synchronous save.

The loop uses it like this (every call on every rank, in the same order)::

    background = BackgroundSaves()
    try:
        for step in ...:
            train_step(...)
            background.finalize_finished()        # publishes saves whose writers are done
            save_checkpoint(..., background=background)   # returns once the writers started
        background.wait()                         # the last save is published before returning
    except BaseException:
        background.abort()                        # stops this rank's writers, publishes nothing
        raise

One save is in flight at a time: a new save first waits for the previous one to be published.
"""

from __future__ import annotations

import logging
from typing import Any

from megatron_ext.checkpoint.directory import CheckpointError

logger = logging.getLogger(__name__)


def save_failed(step: int | None, exc: BaseException, what: str) -> CheckpointError:
    """The error every rank raises when megatron-core reports a failed write of ``step``.

    megatron-core broadcasts a write failure to every rank of the save; the failing ranks and
    their errors are listed on the coordinator (global rank 0) only.
    """
    if getattr(exc, "failures", None) == {}:
        detail = "a write failed on another rank; global rank 0 reports which and why"
    else:
        detail = f"{type(exc).__name__}: {exc}"
    return CheckpointError(f"the {what} of step {step} failed and was not published ({detail})")


class BackgroundSaves:
    """The saves whose writer processes were started and that are not yet published."""

    def __init__(self) -> None:
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        self._calls = AsyncCallsQueue(persistent=False)
        self._steps: dict[int, int] = {}  # megatron-core's call index -> step

    @property
    def in_flight(self) -> int:
        """Saves started and not yet published (the same number on every rank)."""
        return self._calls.get_num_unfinalized_calls()

    def schedule(self, request: Any, step: int) -> None:
        """Start the writers of ``request`` (megatron-core's ``AsyncRequest``) for ``step``."""
        call = self._calls.schedule_async_request(request)
        self._steps[call] = step

    def finalize_finished(self) -> list[int]:
        """Publish every save whose writers have finished on all ranks; returns their steps.

        A collective (one integer all-reduce per save in flight); nothing when none is in flight.
        """
        if self.in_flight == 0:
            return []
        return self._finalize(blocking=False)

    def wait(self) -> list[int]:
        """Wait for the writers of every save in flight and publish them; returns their steps."""
        if self.in_flight == 0:
            return []
        return self._finalize(blocking=True)

    def abort(self) -> None:
        """Stop this rank's writers without publishing (no collective; after an error)."""
        for active in list(self._calls.async_calls):
            active.async_caller.close(abort=True)
            step = self._steps.pop(active.idx, None)
            logger.warning("the background save of step %s was stopped before it finished", step)
        self._calls.async_calls.clear()

    def _finalize(self, blocking: bool) -> list[int]:
        from megatron.core.dist_checkpointing.core import CheckpointingException
        from torch.distributed.checkpoint.api import CheckpointException

        try:
            finished = self._calls.maybe_finalize_async_calls(blocking=blocking)
        except CheckpointError:
            self._forget_finalized()
            raise
        except (CheckpointException, CheckpointingException) as exc:
            # Raised on every rank when any rank's writer failed (with the details on rank 0).
            raise save_failed(self._forget_finalized(), exc, "background save") from exc
        # The publishing step (manager.save_checkpoint) logs each save and its duration.
        return [self._steps.pop(call) for call in finished]

    def _forget_finalized(self) -> int | None:
        """After a failed finalization: drop the calls megatron-core took off its queue.

        Finalization goes oldest first and stops at the failure, so the failed save is the newest
        of them; returns its step.
        """
        active = {call.idx for call in self._calls.async_calls}
        gone = sorted(call for call in self._steps if call not in active)
        step = self._steps[gone[-1]] if gone else None
        for call in gone:
            del self._steps[call]
        return step
