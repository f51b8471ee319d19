"""The results queue of dist_checkpointing's writers on CPU: across fork, any size, in order."""

from __future__ import annotations

import multiprocessing as mp
import queue

import pytest

from megatron_ext.parallel.file_queue import FileQueue


def _put_from_child(results: FileQueue, item: object) -> None:
    results.put(item)


def test_items_come_out_oldest_first_and_empty_raises(tmp_path):
    results = FileQueue(tmp_path / "q")
    with pytest.raises(queue.Empty):
        results.get_nowait()
    assert results.empty()
    for item in ({"a": 1}, [2, 3], "four"):
        results.put(item)
    assert [results.get_nowait() for _ in range(3)] == [{"a": 1}, [2, 3], "four"]
    assert results.empty()
    with pytest.raises(queue.Empty):
        results.get(timeout=0.05)


def test_a_forked_child_hands_back_more_than_a_pipe_holds(tmp_path):
    """A multiprocessing.Queue would keep this child alive until the parent read the item."""
    results = FileQueue(tmp_path / "q")
    payload = {"write_results": list(range(200_000)), "note": "x" * 100_000}
    child = mp.get_context("fork").Process(target=_put_from_child, args=(results, payload))
    child.start()
    child.join(timeout=60)
    assert child.exitcode == 0
    assert results.get_nowait() == payload


def test_the_directory_goes_with_the_queue_in_the_creating_process_only(tmp_path):
    results = FileQueue()
    directory = results.directory
    child = mp.get_context("fork").Process(target=FileQueue.close, args=(results,))
    child.start()
    child.join(timeout=60)
    assert child.exitcode == 0
    assert directory.is_dir(), "a forked child removed its parent's queue directory"
    results.put("item")
    results.close()
    assert not directory.exists()
