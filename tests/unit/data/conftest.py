"""Tiny Megatron indexed datasets written with megatron-core's own builder."""

from __future__ import annotations

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder


def write_indexed_dataset(prefix: str, documents: list[np.ndarray]) -> str:
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for doc in documents:
        builder.add_document(np.asarray(doc, dtype=np.int64), [len(doc)])
    builder.finalize(prefix + ".idx")
    return prefix


def random_documents(
    seed: int, num_docs: int, low: int, high: int, max_len: int, min_len: int = 1
) -> list[np.ndarray]:
    """Documents of random token ids in ``[low, high)``: the id range tells the dataset apart."""
    rng = np.random.default_rng(seed)
    return [
        rng.integers(low, high, int(rng.integers(min_len, max_len + 1))) for _ in range(num_docs)
    ]


@pytest.fixture
def make_dataset(tmp_path):
    """``make_dataset(name, documents) -> prefix`` in the test's temporary directory."""

    def make(name: str, documents: list[np.ndarray]) -> str:
        return write_indexed_dataset(str(tmp_path / name), documents)

    return make


@pytest.fixture
def two_datasets(make_dataset):
    """Dataset ``a`` (ids 0..999, short docs) and ``b`` (ids 1000..1999, longer docs)."""
    docs_a = random_documents(1, 120, 0, 1000, 40)
    docs_b = random_documents(2, 60, 1000, 2000, 150)
    return make_dataset("a", docs_a), make_dataset("b", docs_b), docs_a, docs_b
