"""The documents of an indexed dataset, split into train / valid / test, and how to read them.

``split_index`` computes, once per dataset, each part's document ids and lengths (cached and
memory-mapped through ``IndexCache`` when it has a directory); ``DocumentSource`` reads the
tokens of one part's documents from the memory-mapped ``.bin``.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_ext.data.blend import split_documents
from megatron_ext.data.index_cache import IndexCache, IndexEntry

SPLIT_NAMES = ("train", "valid", "test")


def index_dtype(n: int) -> type:
    """The smallest of int32 / int64 that indexes ``n`` items."""
    return np.int32 if n < 2**31 else np.int64


@dataclass(frozen=True)
class DocumentIndex:
    """Which documents of a dataset a source holds, and their lengths in tokens."""

    document_ids: np.ndarray  # [docs] int32 (int64 past 2**31), ids in the dataset's .idx
    lengths: np.ndarray  # [docs] int32, tokens per document (the appended EOD included)
    num_tokens: int
    identity: dict  # what determines the arrays; part of every index key built on them


def dataset_identity(prefix: str) -> dict:
    """The dataset's files as seen now: a rewritten dataset gets a new identity."""
    idx, bin_ = os.stat(prefix + ".idx"), os.stat(prefix + ".bin")
    return {
        "prefix": os.path.realpath(prefix),
        "idx_bytes": idx.st_size,
        "idx_mtime_ns": idx.st_mtime_ns,
        "bin_bytes": bin_.st_size,
    }


def split_index(
    prefix: str,
    fractions: tuple[float, float, float],
    split_seed: int,
    append_eod: bool,
    cache: IndexCache,
) -> dict[str, DocumentIndex]:
    """Train / valid / test ``DocumentIndex`` of the dataset at ``prefix``."""
    require_dataset(prefix)
    key = {
        "dataset": dataset_identity(prefix),
        "split": [float(f) for f in fractions],
        "split_seed": int(split_seed),
        "append_eod": bool(append_eod),
    }
    entry = cache.get("split", key, lambda: _build_split(prefix, fractions, split_seed, append_eod))
    return {
        name: DocumentIndex(
            entry.arrays[f"{name}_ids"],
            entry.arrays[f"{name}_lengths"],
            int(entry.info[f"{name}_tokens"]),
            {"split": key, "part": name},
        )
        for name in SPLIT_NAMES
    }


def _build_split(
    prefix: str, fractions: tuple[float, float, float], split_seed: int, append_eod: bool
) -> IndexEntry:
    all_lengths = document_lengths(IndexedDataset(prefix, mmap=True), prefix)
    n = all_lengths.size
    arrays, info = {}, {"num_documents_total": int(n)}
    for name, ids in zip(SPLIT_NAMES, split_documents(n, fractions, split_seed)):
        lengths = _part_lengths(prefix, all_lengths, ids, append_eod)
        arrays[f"{name}_ids"] = ids.astype(index_dtype(n))
        arrays[f"{name}_lengths"] = lengths
        info[f"{name}_tokens"] = int(lengths.sum(dtype=np.int64))
    return IndexEntry(arrays, info)


def document_lengths(dataset: IndexedDataset, prefix: str) -> np.ndarray:
    """Tokens per document (int64); checks that sequences are stored back to back."""
    index = dataset.index
    seq_lengths = np.asarray(index.sequence_lengths)
    pointers = np.asarray(index.sequence_pointers)
    itemsize = np.dtype(index.dtype).itemsize
    if pointers.size > 1 and not np.array_equal(
        pointers[1:], pointers[:-1] + seq_lengths[:-1].astype(np.int64) * itemsize
    ):
        raise ValueError(
            f"{prefix}.idx: sequences are not stored back to back in {prefix}.bin; "
            "rewrite the dataset with tools/preprocess_data.py"
        )
    cum = np.zeros(seq_lengths.size + 1, dtype=np.int64)
    np.cumsum(seq_lengths, out=cum[1:])
    at_documents = cum[np.asarray(index.document_indices)]
    return at_documents[1:] - at_documents[:-1]


def _part_lengths(
    prefix: str, all_lengths: np.ndarray, ids: np.ndarray, append_eod: bool
) -> np.ndarray:
    lengths = all_lengths[ids] + (1 if append_eod else 0)
    if lengths.size and lengths.max() >= 2**31:
        raise ValueError(f"{prefix}: a document longer than 2**31 tokens")
    return lengths.astype(np.int32)


def require_dataset(prefix: str) -> None:
    if not IndexedDataset.exists(prefix):
        raise ValueError(f"indexed dataset {prefix!r} not found (expected {prefix}.bin/.idx)")


class DocumentSource:
    """The documents of one indexed dataset that belong to one split.

    A document is Megatron's document (a range of sequences in ``document_indices``); its
    sequences are contiguous in the ``.bin`` file, so a document is read as one span. Memory:
    the part's document ids and lengths (memory-mapped when they come from a cached
    ``split_index``); offsets come from the memory-mapped ``.idx``, tokens from the ``.bin``.

    ``DocumentSource(prefix)`` holds every document; ``DocumentSource(prefix, ids)`` the given
    ones; ``DocumentSource(prefix, index=split_index(...)["train"])`` a computed part.
    """

    def __init__(
        self,
        prefix: str,
        document_ids: np.ndarray | None = None,
        *,
        append_eod: bool = False,
        eod_token_id: int | None = None,
        index: DocumentIndex | None = None,
    ) -> None:
        if append_eod and eod_token_id is None:
            raise ValueError("append_eod needs eod_token_id")
        if index is not None and document_ids is not None:
            raise ValueError("give document_ids or index, not both")
        require_dataset(prefix)
        self.prefix = prefix
        self.dataset = IndexedDataset(prefix, mmap=True)
        self.append_eod = append_eod
        self.eod_token_id = eod_token_id
        dataset_index = self.dataset.index
        self._first_sequence = np.asarray(dataset_index.document_indices)[:-1]
        self._pointers = np.asarray(dataset_index.sequence_pointers)
        self._itemsize = np.dtype(dataset_index.dtype).itemsize
        self.num_documents_total = int(self._first_sequence.size)
        if index is None:
            index = self._index_of(document_ids)
        self.document_ids = index.document_ids
        self.lengths = index.lengths
        self.num_tokens = index.num_tokens
        self.identity = index.identity
        size = os.path.getsize(prefix + ".bin")
        self._tokens = (
            np.memmap(prefix + ".bin", dtype=dataset_index.dtype, mode="r")
            if size > 0
            else np.zeros(0, dtype=dataset_index.dtype)
        )

    def _index_of(self, document_ids: np.ndarray | None) -> DocumentIndex:
        all_lengths = document_lengths(self.dataset, self.prefix)
        if document_ids is None:
            document_ids = np.arange(all_lengths.size)
        ids = np.asarray(document_ids).astype(index_dtype(all_lengths.size))
        lengths = _part_lengths(self.prefix, all_lengths, ids, self.append_eod)
        identity = {
            "dataset": dataset_identity(self.prefix),
            "documents_sha256": hashlib.sha256(ids.astype(np.int64).tobytes()).hexdigest(),
            "append_eod": self.append_eod,
        }
        return DocumentIndex(ids, lengths, int(lengths.sum(dtype=np.int64)), identity)

    def __len__(self) -> int:
        return int(self.document_ids.size)

    def gather(self, local_docs: np.ndarray, offsets: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """Concatenated tokens: ``counts[i]`` tokens of document ``local_docs[i]`` (index into
        this source) from ``offsets[i]``; vectorised over the pieces."""
        total = int(counts.sum())
        first = self._first_sequence[self.document_ids[local_docs]]
        file_start = self._pointers[first] // self._itemsize + offsets
        piece_of_token = np.repeat(np.arange(counts.size), counts)
        within = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
        out = np.empty(total, dtype=np.int64)
        if not self.append_eod:
            out[:] = self._tokens[file_start[piece_of_token] + within]
            return out
        stored = self.lengths[local_docs].astype(np.int64) - 1
        is_eod = offsets[piece_of_token] + within >= stored[piece_of_token]
        keep = ~is_eod
        out[keep] = self._tokens[file_start[piece_of_token[keep]] + within[keep]]
        out[is_eod] = self.eod_token_id
        return out
