"""The data index written once and memory-mapped (megatron_ext.data.index_cache)."""

from __future__ import annotations

import json
import logging
import os
import threading
import time

import numpy as np
import pytest

from megatron_ext.config.errors import ProblemCollector
from megatron_ext.data import index_cache
from megatron_ext.data.config import DataConfig
from megatron_ext.data.index_cache import IndexCache, IndexEntry, entry_name, prune
from megatron_ext.data.token_stream import build_token_streams
from tests.unit.data.conftest import random_documents, write_indexed_dataset

pytestmark = pytest.mark.timeout(120)


def _config(prefixes: list[str], **fields) -> DataConfig:
    fields = {"split": "80,15,5", "blend_weights": [0.3, 0.7], "seed": 5, **fields}
    return DataConfig(data_path=prefixes, eod_token_id=0, **fields)


def _reads(stream, positions: list[int], count: int = 700) -> list[np.ndarray]:
    return [stream.read(p, count) for p in positions]


def test_cached_index_reads_the_same_tokens_from_memory_mapped_files(two_datasets, tmp_path):
    prefix_a, prefix_b, _, _ = two_datasets
    cache_dir = str(tmp_path / "index")
    in_memory = build_token_streams(_config([prefix_a, prefix_b], append_eod=True))
    cache = IndexCache(cache_dir)
    cached = build_token_streams(_config([prefix_a, prefix_b], append_eod=True), cache)
    epoch = in_memory.train.tokens_per_epoch_nominal
    positions = [0, 17, epoch - 350, epoch + 5, 2 * epoch + 123, 3 * epoch - 1]
    for a, b in zip(_reads(in_memory.train, positions), _reads(cached.train, positions)):
        assert np.array_equal(a, b)
    for a, b in zip(_reads(in_memory.valid, [0, 40]), _reads(cached.valid, [0, 40])):
        assert np.array_equal(a, b)
    assert cached.train.fingerprint() == in_memory.train.fingerprint()
    # The arrays a process holds are views of the files, not copies.
    assert all(isinstance(s.lengths, np.memmap) for s in cached.train.sources)
    assert all(isinstance(s.document_ids, np.memmap) for s in cached.valid.sources)
    assert isinstance(cached.train._epoch(1).starts, np.memmap)
    kinds = sorted(name.split("-")[0] for name in cache.built)
    assert kinds.count("split") == 2 and kinds.count("epoch") >= 4  # 3+ train, 1 valid
    # A restarted process builds nothing and reads the same stream.
    again_cache = IndexCache(cache_dir)
    again = build_token_streams(_config([prefix_a, prefix_b], append_eod=True), again_cache)
    for a, b in zip(_reads(in_memory.train, positions), _reads(again.train, positions)):
        assert np.array_equal(a, b)
    assert again_cache.built == []
    for streams in (cached, again):  # the next epochs, built ahead in the background
        streams.train.wait_for_background()
        streams.valid.wait_for_background()
    assert not [n for n in os.listdir(cache_dir) if n.startswith(".tmp-") or "building" in n]


def test_a_changed_dataset_or_seed_never_reads_a_stale_index(make_dataset, tmp_path):
    prefix_a = make_dataset("a", random_documents(1, 80, 3, 500, 30))
    prefix_b = make_dataset("b", random_documents(2, 50, 3, 500, 60))
    cache_dir = str(tmp_path / "index")
    build_token_streams(_config([prefix_a, prefix_b]), IndexCache(cache_dir)).train.read(0, 5000)
    # Another seed: new orders and epochs, the same split entries.
    cache = IndexCache(cache_dir)
    reseeded = build_token_streams(_config([prefix_a, prefix_b], seed=6), cache)
    reseeded.train.read(0, 5000)
    assert {n.split("-")[0] for n in cache.built} == {"order", "epoch"}
    # The dataset rewritten in place (more documents): everything is rebuilt and matches memory.
    time.sleep(0.01)  # a distinct modification time even on coarse clocks
    write_indexed_dataset(prefix_b, random_documents(3, 70, 3, 500, 60))
    cache = IndexCache(cache_dir)
    rewritten = build_token_streams(_config([prefix_a, prefix_b]), cache)
    reference = build_token_streams(_config([prefix_a, prefix_b]))
    assert np.array_equal(rewritten.train.read(0, 8000), reference.train.read(0, 8000))
    assert sorted(n.split("-")[0] for n in cache.built).count("split") == 1  # only b's


def test_a_second_process_waits_for_the_builder_instead_of_building(tmp_path):
    cache = IndexCache(str(tmp_path), poll_s=0.01)
    started, release = threading.Event(), threading.Event()
    calls = []

    def build() -> IndexEntry:
        calls.append(threading.get_ident())
        started.set()
        release.wait(10)
        return IndexEntry({"values": np.arange(10)}, {"total": 45})

    results = {}
    first = threading.Thread(target=lambda: results.update(a=cache.get("t", {"k": 1}, build)))
    first.start()
    started.wait(10)
    second = threading.Thread(target=lambda: results.update(b=cache.get("t", {"k": 1}, build)))
    second.start()
    time.sleep(0.2)
    assert "b" not in results, "the second caller must wait while the entry is being built"
    release.set()
    first.join(10)
    second.join(10)
    assert len(calls) == 1
    assert np.array_equal(results["a"].arrays["values"], results["b"].arrays["values"])
    assert results["b"].info == {"total": 45}


def test_waiting_processes_look_less_often_the_longer_a_build_takes(tmp_path, monkeypatch):
    looks = []
    real_mtime = index_cache._mtime
    monkeypatch.setattr(index_cache, "_mtime", lambda path: looks.append(path) or real_mtime(path))
    cache = IndexCache(str(tmp_path), poll_s=0.01, max_poll_s=0.2)
    started = threading.Event()

    def slow_build() -> IndexEntry:
        started.set()
        time.sleep(1.5)
        return IndexEntry({"x": np.arange(3)}, {})

    builder = threading.Thread(target=lambda: cache.get("t", {"k": 9}, slow_build))
    builder.start()
    started.wait(10)
    entry = IndexCache(str(tmp_path), poll_s=0.01, max_poll_s=0.2).get(
        "t", {"k": 9}, lambda: pytest.fail("the waiter must not build")
    )
    builder.join(10)
    assert entry.arrays["x"].tolist() == [0, 1, 2]
    # 1.5 s of waiting: 150 looks at a fixed 0.01 s, about 15 with the backoff.
    assert 3 <= len(looks) <= 25, len(looks)


def test_a_dead_builder_is_taken_over_and_a_failed_build_leaves_nothing(tmp_path, caplog):
    cache = IndexCache(str(tmp_path), stale_after_s=0.3, poll_s=0.02)
    key = {"k": 2}
    marker = tmp_path / (entry_name("t", key) + ".building")
    marker.write_text("other-host 1234\n")  # its builder died: the marker never changes
    partial = _temp_dir(tmp_path, entry_name("t", key), "other-host-1234-1", age_s=3600)
    # A temporary directory still being written (a builder that took over just before us) stays.
    live = _temp_dir(tmp_path, entry_name("t", key), "third-host-77-1", age_s=-60)
    with caplog.at_level(logging.WARNING, logger="megatron_ext.data.index_cache"):
        entry = cache.get("t", key, lambda: IndexEntry({"x": np.ones(3)}, {}))
    assert entry.arrays["x"].tolist() == [1.0, 1.0, 1.0]
    assert "stopped updating" in caplog.text
    assert not marker.exists()
    assert not partial.exists() and f"removing {partial}" in caplog.text
    assert live.exists()

    def failing() -> IndexEntry:
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        cache.get("t", {"k": 3}, failing)
    assert not (tmp_path / (entry_name("t", {"k": 3}) + ".building")).exists()
    assert not (tmp_path / entry_name("t", {"k": 3})).exists()
    assert cache.get("t", {"k": 3}, lambda: IndexEntry({"x": np.zeros(2)}, {})).arrays["x"].size


def _temp_dir(directory, entry: str, builder: str, age_s: float):
    """A builder's temporary directory with one file, last written ``age_s`` ago."""
    temp = directory / f".tmp-{entry}-{builder}"
    temp.mkdir()
    (temp / "order.npy").write_bytes(b"x" * 100)
    when = time.time() - age_s
    for path in (temp / "order.npy", temp):
        os.utime(path, (when, when))
    return temp


def test_prune_keeps_what_is_named_and_what_is_in_use(tmp_path):
    cache = IndexCache(str(tmp_path))
    for k in range(3):
        cache.get("order", {"k": k}, lambda: IndexEntry({"x": np.arange(1000)}, {}))
    names = [entry_name("order", {"k": k}) for k in range(3)]
    assert cache.used == set(names)
    stale_marker = tmp_path / "epoch-0123456789abcdef01234567.building"
    stale_marker.write_text("gone-host 1\n")
    os.utime(stale_marker, (time.time() - 3600,) * 2)
    fresh_marker = tmp_path / "epoch-89abcdef0123456789abcdef.building"
    fresh_marker.write_text("busy-host 2\n")
    stale_temp = _temp_dir(tmp_path, names[0], "gone-host-1-1", age_s=3600)
    fresh_temp = _temp_dir(tmp_path, names[1], "busy-host-2-1", age_s=0)
    (tmp_path / "notes.txt").write_text("not an index entry")
    (tmp_path / "order-notanentry").mkdir()

    report = prune(str(tmp_path), keep={names[0]})

    removed = [names[1], names[2], stale_marker.name, stale_temp.name]
    assert sorted(report.removed) == sorted(removed)
    entry_bytes = sum(f.stat().st_size for f in (tmp_path / names[0]).iterdir())
    assert report.freed_bytes == 2 * entry_bytes + len("gone-host 1\n") + 100
    remaining = {p.name for p in tmp_path.iterdir()}
    assert remaining == {
        names[0],
        fresh_marker.name,
        fresh_temp.name,
        "notes.txt",
        "order-notanentry",
    }
    # A pruned entry is built again when read; a kept one is only loaded.
    again = IndexCache(str(tmp_path))
    again.get("order", {"k": 0}, lambda: IndexEntry({"x": np.arange(1000)}, {}))
    again.get("order", {"k": 2}, lambda: IndexEntry({"x": np.arange(1000)}, {}))
    assert again.built == [names[2]]


def test_an_entry_left_incomplete_is_pruned_and_then_rebuilt(tmp_path):
    """An interrupted removal (an NFS file still open elsewhere) leaves an entry without its
    meta.json: loading it fails with the fix, and prune clears it once it is stale."""
    cache = IndexCache(str(tmp_path))
    build = lambda: IndexEntry({"x": np.arange(1000)}, {})  # noqa: E731
    cache.get("order", {"k": 0}, build)
    name = entry_name("order", {"k": 0})
    (tmp_path / name / "meta.json").unlink()
    with pytest.raises(ValueError, match="incomplete"):
        IndexCache(str(tmp_path), poll_s=0.001).get("order", {"k": 0}, build)
    assert prune(str(tmp_path), keep=set()).removed == []  # changed just now: maybe in use
    for item in (tmp_path / name).iterdir():
        os.utime(item, (time.time() - 3600,) * 2)
    os.utime(tmp_path / name, (time.time() - 3600,) * 2)
    assert prune(str(tmp_path), keep=set()).removed == [name]
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    again = IndexCache(str(tmp_path))
    again.get("order", {"k": 0}, build)
    assert again.built == [name]


def test_an_entry_pruned_while_it_is_read_is_built_again(tmp_path):
    # Another job's ``build_data_index.py --prune`` deletes the entries this process reads.
    cache = IndexCache(str(tmp_path), poll_s=0.001, max_poll_s=0.01)
    stop = threading.Event()
    pruner_errors = []

    def prune_all_the_time() -> None:
        # Entries appear, temporary directories are renamed, while it lists and deletes.
        try:
            while not stop.is_set():
                prune(str(tmp_path), keep=set())
        except Exception as exc:  # noqa: BLE001 - reported by the test below
            pruner_errors.append(exc)

    def build() -> IndexEntry:
        return IndexEntry({"a": np.arange(5000), "b": np.arange(70)}, {"n": 1})

    pruner = threading.Thread(target=prune_all_the_time)
    pruner.start()
    deadline = time.monotonic() + 30
    try:
        while len(cache.built) < 50 and time.monotonic() < deadline:
            entry = cache.get("t", {"k": 1}, build)
            assert entry.arrays["a"][-1] == 4999 and entry.arrays["b"].size == 70
    finally:
        stop.set()
        pruner.join(10)
    assert pruner_errors == []
    assert len(cache.built) >= 50, "the entry was not deleted often enough to test anything"

    # An entry that stays incomplete is an error, after a few looks.
    cache.get("t", {"k": 2}, build)
    os.remove(tmp_path / entry_name("t", {"k": 2}) / "b.npy")
    with pytest.raises(ValueError, match=r"is incomplete \(.*b.npy is missing\)"):
        cache.get("t", {"k": 2}, build)


def test_an_entry_that_does_not_match_its_name_is_a_clear_error(tmp_path):
    cache = IndexCache(str(tmp_path))
    cache.get("t", {"k": 4}, lambda: IndexEntry({"x": np.arange(4)}, {}))
    meta_path = tmp_path / entry_name("t", {"k": 4}) / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["key"] = {"k": 5}
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="delete it and it will be rebuilt"):
        IndexCache(str(tmp_path)).get("t", {"k": 4}, lambda: IndexEntry({}, {}))
    np.save(tmp_path / entry_name("t", {"k": 4}) / "x.npy", np.arange(3))
    meta["key"] = {"k": 4}
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"x.npy is .* \[3\], meta.json says"):
        IndexCache(str(tmp_path)).get("t", {"k": 4}, lambda: IndexEntry({}, {}))


def test_index_cache_dir_must_be_a_directory(tmp_path):
    afile = tmp_path / "file"
    afile.write_text("")
    problems = ProblemCollector()
    DataConfig(data_path=["x"], index_cache_dir=str(afile)).validate(problems, check_files=False)
    assert [p.field for p in problems.problems] == ["data.index_cache_dir"]
