"""How preprocess starts its worker processes."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest

from megatron_ext.data.preprocess import _start_method, preprocess


def test_auto_forks_a_process_without_other_threads():
    code = "from megatron_ext.data.preprocess import _start_method; print(_start_method('auto'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "fork"


def test_auto_spawns_while_another_thread_runs():
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    try:
        assert _start_method("auto") == "spawn"
    finally:
        stop.set()
        thread.join()
    assert _start_method("spawn") == "spawn" and _start_method("fork") == "fork"


def test_unknown_start_method_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="start_method must be one of"):
        preprocess(str(tmp_path / "x.jsonl"), str(tmp_path / "o"), "X", "y", start_method="thread")
