"""SIGTERM/SIGUSR1 set a flag; previous handlers come back on close."""

from __future__ import annotations

import os
import signal

import pytest

from megatron_ext.checkpoint.preemption import PreemptionHandler


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_sets_the_flag_and_close_restores(sig):
    seen = []
    previous = signal.signal(sig, lambda signum, frame: seen.append(signum))
    try:
        handler = PreemptionHandler()
        assert not handler.requested
        assert not handler.should_stop(None)
        os.kill(os.getpid(), sig)
        assert handler.received == sig
        assert handler.should_stop(None)
        assert seen == []  # the earlier handler did not run while ours was installed
        handler.close()
        os.kill(os.getpid(), sig)
        assert seen == [sig]
    finally:
        signal.signal(sig, previous)


def test_context_manager_restores_default():
    before = signal.getsignal(signal.SIGTERM)
    with PreemptionHandler() as handler:
        assert signal.getsignal(signal.SIGTERM) == handler._handle
    assert signal.getsignal(signal.SIGTERM) == before
