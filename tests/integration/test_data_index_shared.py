"""Processes that start together share one data index: each entry is written by one of them."""

from __future__ import annotations

import os

import numpy as np
import pytest

from megatron_ext.data.config import DataConfig
from megatron_ext.data.index_cache import IndexCache
from megatron_ext.data.token_stream import build_token_streams
from megatron_ext.parallel.local_launch import run_on_local_processes
from tests.unit.data.conftest import random_documents, write_indexed_dataset

pytestmark = pytest.mark.timeout(300)


def _config(prefixes: list[str]) -> DataConfig:
    return DataConfig(data_path=prefixes, blend_weights=[0.6, 0.4], split="90,10", seed=3)


def _read(rank: int, prefixes: list[str], cache_dir: str, positions: list[int]) -> dict:
    cache = IndexCache(cache_dir, poll_s=0.02)
    streams = build_token_streams(_config(prefixes), cache)
    tokens = [streams.train.read(p, 300) for p in positions]
    tokens.append(streams.valid.read(0, 300))
    streams.train.wait_for_background()
    streams.valid.wait_for_background()
    return {"tokens": tokens, "built": cache.built}


def test_four_processes_build_each_entry_once_and_read_the_same_stream(tmp_path):
    prefixes = [
        write_indexed_dataset(str(tmp_path / "a"), random_documents(1, 400, 3, 900, 50)),
        write_indexed_dataset(str(tmp_path / "b"), random_documents(2, 150, 900, 1800, 120)),
    ]
    reference = build_token_streams(_config(prefixes))
    epoch = reference.train.tokens_per_epoch_nominal
    positions = [0, epoch // 2 + 7, epoch + 11, 2 * epoch - 100]
    cache_dir = str(tmp_path / "index")
    results = run_on_local_processes(_read, 4, prefixes, cache_dir, positions)

    expected = [reference.train.read(p, 300) for p in positions] + [reference.valid.read(0, 300)]
    for result in results:
        assert all(np.array_equal(a, b) for a, b in zip(result["tokens"], expected))
    built = [name for result in results for name in result["built"]]
    entries = os.listdir(cache_dir)
    assert sorted(built) == sorted(entries), "every entry written exactly once, nothing left over"
    assert sorted({name.split("-")[0] for name in built}) == ["epoch", "order", "split"]
