"""Stages 3 and 4: exact and near (MinHash LSH) deduplication.

Both work in two steps so that the result does not depend on how documents were spread over
worker processes: workers compute per-document keys (a 128-bit hash of the normalised text; the
LSH band keys of a MinHash signature), the driver collects them in input order and decides at
the end which documents are duplicates. Memory is per document, never per byte of text:
16 bytes for the exact key and 8 bytes per band (the band keys can live in a memory-mapped file).

Exact: the first document (in input order) of each group of equal keys is kept.
Near: documents sharing any band key are linked; each connected cluster keeps its first document
in input order. With b bands of r rows, a pair with Jaccard similarity s of its shingle sets is
linked with probability 1 - (1 - s^r)^b, which is 1/2 near s = (1/b)^(1/r).
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Iterable

import numpy as np

from megatron_ext.curation.config import ExactDedupConfig, NearDedupConfig
from megatron_ext.curation.text import normalized_words

_MASK_32 = np.uint64(0xFFFFFFFF)
# Odd 64-bit multipliers for combining word hashes into shingle hashes and rows into band keys.
_MIX_A = np.uint64(0x9E3779B97F4A7C15)
_MIX_B = np.uint64(0xC2B2AE3D27D4EB4F)


def exact_key(text: str, config: ExactDedupConfig) -> bytes:
    """16-byte key of the text as exact deduplication compares it."""
    if config.ignore_punctuation:
        normal = " ".join(normalized_words(text))
    else:
        normal = " ".join(text.split())
        if config.casefold:
            normal = normal.casefold()
    return hashlib.blake2b(normal.encode("utf-8"), digest_size=16).digest()


def shingle_hashes(words: list[str], ngram_size: int) -> np.ndarray:
    """32-bit hashes of the distinct word n-grams (a text shorter than n is one shingle)."""
    if not words:
        return np.zeros(0, dtype=np.uint64)
    word_hashes = np.fromiter(
        (zlib.crc32(w.encode("utf-8")) for w in words), dtype=np.uint64, count=len(words)
    )
    n = min(ngram_size, len(words))
    num = len(words) - n + 1
    combined = np.zeros(num, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for k in range(n):
            combined = combined * _MIX_A + word_hashes[k : k + num] + np.uint64(k + 1)
        combined ^= combined >> np.uint64(29)
        combined *= _MIX_B
        combined ^= combined >> np.uint64(32)
    return np.unique(combined & _MASK_32)


class MinHasher:
    """MinHash signatures of word n-gram shingles and their LSH band keys."""

    def __init__(self, config: NearDedupConfig):
        self.config = config
        self.num_perm = config.num_bands * config.rows_per_band
        rng = np.random.default_rng(config.seed)
        # Multiply-add-shift hashing (Dietzfelbinger): h_i(x) = ((a_i * x + b_i) mod 2^64) >> 32
        # for 32-bit x is a universal family and needs no slow 64-bit modulo.
        self._a = rng.integers(1, 1 << 63, size=self.num_perm, dtype=np.uint64) * np.uint64(2) + 1
        self._b = rng.integers(0, 1 << 63, size=self.num_perm, dtype=np.uint64)
        self._band_mix = rng.integers(1, 1 << 63, size=config.rows_per_band, dtype=np.uint64) | 1

    def signature_of_hashes(self, hashes: np.ndarray) -> np.ndarray:
        """uint32 signature [num_perm] of a set of 32-bit shingle hashes (all-ones if empty)."""
        if hashes.size == 0:
            return np.full(self.num_perm, 0xFFFFFFFF, dtype=np.uint64)
        result = np.full(self.num_perm, 0xFFFFFFFF, dtype=np.uint64)
        # Blocks bound the [shingles, num_perm] temporary for very long documents.
        for start in range(0, hashes.size, 4096):
            block = hashes[start : start + 4096, None]
            with np.errstate(over="ignore"):
                values = (block * self._a[None, :] + self._b[None, :]) >> np.uint64(32)
            np.minimum(result, values.min(axis=0), out=result)
        return result

    def signature(self, text: str) -> np.ndarray:
        return self.signature_of_hashes(
            shingle_hashes(normalized_words(text), self.config.ngram_size)
        )

    def text_band_keys(self, text: str) -> np.ndarray | None:
        """Band keys of a text, or None when it has no word to shingle (such documents are
        left out of near deduplication instead of all colliding with each other)."""
        hashes = shingle_hashes(normalized_words(text), self.config.ngram_size)
        if hashes.size == 0:
            return None
        return self.band_keys(self.signature_of_hashes(hashes))

    def band_keys(self, signature: np.ndarray) -> np.ndarray:
        """One uint64 key per band [num_bands]: a hash of that band's rows."""
        rows = signature.reshape(self.config.num_bands, self.config.rows_per_band)
        with np.errstate(over="ignore"):
            keys = (rows * self._band_mix[None, :]).sum(axis=1, dtype=np.uint64)
            keys ^= keys >> np.uint64(31)
            keys *= _MIX_B
        return keys


def exact_duplicate_mask(keys: np.ndarray) -> np.ndarray:
    """keys: [n, 16] uint8 in input order. True where an earlier document has the same key."""
    n = keys.shape[0]
    if n == 0:
        return np.zeros(0, dtype=bool)
    as_pairs = np.ascontiguousarray(keys).view(np.uint64).reshape(n, 2)
    order = np.lexsort((np.arange(n), as_pairs[:, 1], as_pairs[:, 0]))
    sorted_pairs = as_pairs[order]
    same_as_previous = np.zeros(n, dtype=bool)
    same_as_previous[1:] = np.all(sorted_pairs[1:] == sorted_pairs[:-1], axis=1)
    duplicate = np.zeros(n, dtype=bool)
    duplicate[order] = same_as_previous
    return duplicate


def near_duplicate_mask(band_keys: np.ndarray) -> np.ndarray:
    """band_keys: [n, bands] uint64 in input order.

    True for every document that is not the first (in input order) of its LSH cluster.
    """
    n, bands = band_keys.shape
    return near_duplicate_mask_from_columns((band_keys[:, b] for b in range(bands)), n)


def near_duplicate_mask_from_columns(columns: Iterable[np.ndarray], n: int) -> np.ndarray:
    """Like ``near_duplicate_mask`` with the band keys given one band (column of n) at a time,
    so only one column is in memory: 8 bytes per document plus the sort and union-find arrays."""
    parent = np.arange(n, dtype=np.int64)

    def find(i: int) -> int:
        root = i
        while parent[root] != root:
            root = parent[root]
        while parent[i] != root:
            parent[i], i = root, parent[i]
        return root

    for column in columns:
        column = np.asarray(column)
        assert column.shape == (n,), (column.shape, n)
        order = np.argsort(column, kind="stable")
        sorted_keys = column[order]
        starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
        sizes = np.diff(np.r_[starts, n])
        for start, size in zip(starts[sizes > 1], sizes[sizes > 1]):
            first = find(int(order[start]))
            for j in order[start + 1 : start + size]:
                other = find(int(j))
                if other != first:
                    # The smaller index becomes the root, so each root is its cluster's first.
                    low, high = (first, other) if first < other else (other, first)
                    parent[high] = low
                    first = low
    roots = parent
    while True:  # pointer jumping until every document points at its root
        jumped = roots[roots]
        if np.array_equal(jumped, roots):
            break
        roots = jumped
    return roots != np.arange(n)
