"""Stop cleanly when the scheduler preempts the job.

SLURM sends SIGTERM before it kills a job; ahead of the time limit, the batch shell of
``launch/slurm_multi_node.sbatch`` (``#SBATCH --signal=B:USR1@360``) relays SIGUSR1 to the ranks
and requeues the job once they exited (docs/launch.md). The handler only records the signal; the
loop finishes the current step, asks ``should_stop`` (agreed by all ranks, so every rank saves the
same step), saves, and exits with status 0 so that a requeued job resumes from that checkpoint::

    preemption = PreemptionHandler()
    try:
        for step in ...:
            train_step(...)
            if preemption.should_stop(ctx):
                save_checkpoint(...)
                break
    finally:
        preemption.close()
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

DEFAULT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionHandler:
    """Records SIGTERM/SIGUSR1 and restores the previous handlers on ``close``."""

    def __init__(self, signals: tuple[signal.Signals, ...] = DEFAULT_SIGNALS) -> None:
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, Any] = {}
        if threading.current_thread() is not threading.main_thread():
            # Python only delivers signals to the main thread's handlers.
            logger.warning("preemption signals are not handled: not on the main thread")
            return
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signal.Signals(signum)
        logger.warning("received %s: saving a checkpoint after this step", self.received.name)

    @property
    def requested(self) -> bool:
        """Whether this process received a preemption signal."""
        return self.received is not None

    def should_stop(self, ctx: Any) -> bool:
        """True on every rank when any rank received a signal (a collective: call on all ranks).

        ``ctx`` is the ``ParallelContext`` (its ``torch_device`` places the flag for NCCL).
        """
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self.requested
        flag = torch.tensor(
            [1 if self.requested else 0], dtype=torch.int32, device=ctx.torch_device
        )
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def close(self) -> None:
        """Put back the handlers that were installed before this one."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def __enter__(self) -> PreemptionHandler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
