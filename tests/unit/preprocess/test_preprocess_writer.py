"""The indexed dataset writer: byte identity with megatron-core, appends, merges, errors."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

from megatron_ext.data.indexed_writer import (
    IndexedDatasetWriter,
    dtype_for_vocab,
    merge_datasets,
    read_index,
)


def random_documents(seed: int, vocab: int, num_docs: int = 300):
    """Documents as lists of sequences; some have several sequences, one has none."""
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(num_docs):
        num_seqs = 0 if i == 7 else int(rng.integers(1, 4)) if i % 5 == 0 else 1
        docs.append([rng.integers(0, vocab, int(rng.integers(1, 200))) for _ in range(num_seqs)])
    return docs


def write_with_megatron(prefix: str, docs, dtype) -> None:
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for seqs in docs:
        ids = np.concatenate(seqs) if seqs else np.zeros(0, dtype=np.int64)
        builder.add_document(torch.from_numpy(ids), [len(s) for s in seqs])
    builder.finalize(prefix + ".idx")


def write_with_ours(prefix: str, docs, dtype, buffer_entries: int = 1 << 20) -> None:
    with IndexedDatasetWriter(prefix, dtype, buffer_entries=buffer_entries) as writer:
        for seqs in docs:
            ids = np.concatenate(seqs) if seqs else np.zeros(0, dtype=np.int64)
            writer.add_document(ids, [len(s) for s in seqs])


def same_bytes(a: str, b: str) -> bool:
    return all(
        open(a + suffix, "rb").read() == open(b + suffix, "rb").read()
        for suffix in (".bin", ".idx")
    )


@pytest.mark.parametrize(("dtype", "vocab"), [(np.uint16, 65536), (np.int32, 200_000)])
@pytest.mark.parametrize("buffer_entries", [1 << 20, 7])
def test_bytes_identical_to_megatron_core_builder(tmp_path, dtype, vocab, buffer_entries):
    docs = random_documents(0, vocab)
    write_with_megatron(str(tmp_path / "ref"), docs, dtype)
    write_with_ours(str(tmp_path / "ours"), docs, dtype, buffer_entries)
    assert same_bytes(str(tmp_path / "ref"), str(tmp_path / "ours"))
    dataset = IndexedDataset(str(tmp_path / "ours"))
    flat = [s for seqs in docs for s in seqs]
    assert len(dataset) == len(flat)
    assert all(np.array_equal(dataset[i], s) for i, s in enumerate(flat))
    assert dataset.index.dtype == dtype


def test_65535_survives_uint16(tmp_path):
    with IndexedDatasetWriter(str(tmp_path / "d"), dtype_for_vocab(65536)) as writer:
        writer.add_document([0, 65535, 65534])
    # Keep the dataset referenced: it unmaps its files when collected.
    dataset = IndexedDataset(str(tmp_path / "d"))
    assert dataset[0].tolist() == [0, 65535, 65534]


def test_dtype_for_vocab():
    assert dtype_for_vocab(2000) == np.uint16
    assert dtype_for_vocab(65536) == np.uint16
    assert dtype_for_vocab(65537) == np.int32


def test_append_and_merge_equal_one_builder_over_all_documents(tmp_path):
    parts = [random_documents(seed, 65536, 50) for seed in (1, 2, 3)]
    for i, docs in enumerate(parts):
        write_with_ours(str(tmp_path / f"part{i}"), docs, np.uint16)
    write_with_megatron(str(tmp_path / "ref"), [d for docs in parts for d in docs], np.uint16)
    index = merge_datasets([str(tmp_path / f"part{i}") for i in range(3)], str(tmp_path / "all"))
    assert index.num_documents == 150
    assert same_bytes(str(tmp_path / "ref"), str(tmp_path / "all"))


def test_merge_refuses_mixed_dtypes_and_missing_inputs(tmp_path):
    write_with_ours(str(tmp_path / "a"), random_documents(1, 100, 5), np.uint16)
    write_with_ours(str(tmp_path / "b"), random_documents(2, 100, 5), np.int32)
    with pytest.raises(ValueError, match="different dtypes"):
        merge_datasets([str(tmp_path / "a"), str(tmp_path / "b")], str(tmp_path / "ab"))
    with pytest.raises(ValueError, match="no indexed dataset"):
        merge_datasets([str(tmp_path / "a"), str(tmp_path / "missing")], str(tmp_path / "ab"))
    assert not any(p.name.startswith("ab") for p in tmp_path.iterdir())


def test_read_index_rejects_other_files(tmp_path):
    (tmp_path / "x.idx").write_bytes(b"not an index at all, just bytes")
    (tmp_path / "x.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="bad magic"):
        read_index(str(tmp_path / "x"))


def test_abort_leaves_nothing_and_unfinished_output_is_invisible(tmp_path):
    prefix = str(tmp_path / "d")
    with pytest.raises(RuntimeError):
        with IndexedDatasetWriter(prefix, np.uint16) as writer:
            writer.add_document([1, 2, 3])
            assert not os.path.exists(prefix + ".bin")  # only the temporary name exists
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_sequence_lengths_must_match_the_document(tmp_path):
    with IndexedDatasetWriter(str(tmp_path / "d"), np.uint16) as writer:
        with pytest.raises(ValueError, match="sum to"):
            writer.add_document([1, 2, 3], [2])
        writer.add_document([1, 2, 3], [2, 1])
    assert read_index(str(tmp_path / "d")).num_sequences == 2
