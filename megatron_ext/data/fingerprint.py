"""What an indexed dataset holds, summarised without where it lives.

A checkpoint records the fingerprint of every dataset it trained on (``run_state.json``, key
``data``), and a resume compares them with the datasets the config names now
(``checkpoint.compatibility.check_config_change``). That tells apart the two things a changed or
unchanged ``data.data_path`` can hide on a cluster:

- the same files copied elsewhere (to a node-local disk, another scratch filesystem): a new path,
  the same fingerprint, and the resume goes on with the same token stream;
- a dataset rewritten in place (preprocessed again with another tokenizer or more documents): the
  same path, a new fingerprint, and the resume is refused like any other change of what is trained.

The fingerprint holds the counts of the ``.idx`` header, both file sizes and a SHA-256 over the
whole files when they are small, else over ``SAMPLED_BLOCKS`` blocks of ``BLOCK_BYTES`` spread
evenly over each file (both ends included). Reading is constant-time whatever the dataset's size.
A rewrite changes the sizes or the counts, or moves the bytes under the sampled blocks (a
re-tokenisation, a re-ordering, documents added or removed); an edit that keeps both sizes and
touches only bytes between the sampled blocks is not seen. File times are left out on purpose: a
copy changes them, not the content.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_ext.data.documents import require_dataset

FINGERPRINT_VERSION = 1
"""Bumped with any change of what is read or hashed: fingerprints of another version are not
compared (a resume then compares the datasets by path only)."""
SAMPLED_BLOCKS = 256
BLOCK_BYTES = 4096
FINGERPRINT_FIELDS = (
    "version",
    "documents",
    "sequences",
    "dtype",
    "idx_bytes",
    "bin_bytes",
    "sha256",
)


def dataset_fingerprint(prefix: str) -> dict:
    """The fingerprint of the indexed dataset ``prefix`` (``.bin`` and ``.idx``)."""
    require_dataset(prefix)
    index = IndexedDataset(prefix, mmap=True).index
    digest = hashlib.sha256()
    sizes = {}
    for suffix in ("idx", "bin"):
        path = f"{prefix}.{suffix}"
        sizes[suffix] = os.path.getsize(path)
        digest.update(suffix.encode())
        _sample_into(digest, path, sizes[suffix])
    return {
        "version": FINGERPRINT_VERSION,
        "documents": int(np.asarray(index.document_indices).size - 1),
        "sequences": len(index),
        "dtype": np.dtype(index.dtype).name,
        "idx_bytes": sizes["idx"],
        "bin_bytes": sizes["bin"],
        "sha256": digest.hexdigest(),
    }


def data_fingerprints(data_path: list[str]) -> list[dict]:
    """One fingerprint per entry of ``data.data_path``, in its order."""
    return [dataset_fingerprint(prefix) for prefix in data_path]


def describe(fingerprint: dict) -> str:
    """``12,345 documents, 6,789,012 tokens (uint16)`` for messages."""
    tokens = fingerprint["bin_bytes"] // np.dtype(fingerprint["dtype"]).itemsize
    return f"{fingerprint['documents']:,} documents, {tokens:,} tokens ({fingerprint['dtype']})"


def _sample_into(digest, path: str, size: int) -> None:
    """Hash the whole file when it is at most ``SAMPLED_BLOCKS`` blocks, else the sampled blocks.

    Unbuffered: a buffered file fills its buffer (the filesystem's block size, 4 MiB and more on
    Lustre or GPFS) at every seek, which would read a thousand times the sampled bytes."""
    with open(path, "rb", buffering=0) as file:
        if size <= SAMPLED_BLOCKS * BLOCK_BYTES:
            digest.update(file.read())
            return
        starts = np.linspace(0, size - BLOCK_BYTES, SAMPLED_BLOCKS).astype(np.int64)
        for start in starts:
            digest.update(os.pread(file.fileno(), BLOCK_BYTES, int(start)))
