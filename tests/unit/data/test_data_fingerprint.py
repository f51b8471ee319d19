"""A dataset's fingerprint follows its content, not its path or file times."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from megatron_ext.data.fingerprint import (
    BLOCK_BYTES,
    FINGERPRINT_FIELDS,
    SAMPLED_BLOCKS,
    data_fingerprints,
    dataset_fingerprint,
    describe,
)
from tests.unit.data.conftest import random_documents


def _copy(prefix: str, to: str) -> str:
    for suffix in (".bin", ".idx"):
        shutil.copyfile(prefix + suffix, to + suffix)  # new inode, new times
    return to


@pytest.fixture(params=["small", "sampled"])
def documents(request) -> list[np.ndarray]:
    """A dataset hashed whole, and one big enough that only sampled blocks are read."""
    if request.param == "small":
        return random_documents(3, 200, 0, 60000, 100)
    docs = random_documents(4, 3000, 0, 60000, 700, min_len=300)
    assert sum(map(len, docs)) * 2 > 2 * SAMPLED_BLOCKS * BLOCK_BYTES
    return docs


def test_a_copy_elsewhere_has_the_same_fingerprint(make_dataset, tmp_path, documents):
    prefix = make_dataset("a", documents)
    (tmp_path / "elsewhere").mkdir()
    copy = _copy(prefix, str(tmp_path / "elsewhere" / "renamed"))
    os.utime(copy + ".bin", ns=(1, 1))
    fingerprint = dataset_fingerprint(prefix)
    assert tuple(fingerprint) == FINGERPRINT_FIELDS
    assert dataset_fingerprint(copy) == fingerprint
    assert fingerprint["documents"] == fingerprint["sequences"] == len(documents)
    tokens = sum(map(len, documents))
    assert describe(fingerprint) == f"{len(documents):,} documents, {tokens:,} tokens (uint16)"


def test_rewritten_datasets_get_new_fingerprints(make_dataset, documents):
    original = dataset_fingerprint(make_dataset("a", documents))
    # The same documents in another order: same sizes and counts, other bytes.
    reordered = dataset_fingerprint(make_dataset("b", documents[::-1]))
    assert {k for k in original if original[k] != reordered[k]} == {"sha256"}
    # One document more, and one token more.
    extra = dataset_fingerprint(make_dataset("c", [*documents, np.array([5])]))
    assert extra["documents"] == original["documents"] + 1
    assert extra["bin_bytes"] == original["bin_bytes"] + 2


def test_the_last_token_is_read(make_dataset, documents):
    """Both ends of each file are among the bytes read (sampled or whole)."""
    original = dataset_fingerprint(make_dataset("a", documents))
    edited = [*documents[:-1], documents[-1].copy()]
    edited[-1][-1] = (edited[-1][-1] + 1) % 60000
    assert dataset_fingerprint(make_dataset("b", edited))["sha256"] != original["sha256"]


def test_one_fingerprint_per_path_in_order(two_datasets):
    a, b, _, _ = two_datasets
    assert data_fingerprints([b, a]) == [dataset_fingerprint(b), dataset_fingerprint(a)]


def test_a_missing_dataset_is_named(tmp_path):
    with pytest.raises(ValueError, match="nowhere.*expected"):
        dataset_fingerprint(str(tmp_path / "nowhere"))
