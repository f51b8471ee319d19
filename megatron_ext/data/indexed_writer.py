"""Write (and read the index of) Megatron indexed datasets with bounded memory.

The format is megatron-core's ``IndexedDataset`` (``{prefix}.bin`` + ``{prefix}.idx``):

    .idx  b"MMIDIDX\\x00\\x00" | u64 version = 1 | u8 dtype code | u64 num_sequences
          | u64 num_documents + 1 | int32 sequence lengths | int64 sequence byte offsets
          | int64 document boundaries (sequence indices, starting at 0)
    .bin  the token ids, dtype ``uint16`` or ``int32``, back to back

``IndexedDatasetWriter`` writes exactly the bytes megatron-core's ``IndexedDatasetBuilder``
writes for the same ids and dtype, but keeps the per-sequence index on disk while it grows (the
builder holds it in Python lists), so memory does not grow with the dataset. Both files are
written under temporary names and renamed into place by ``finalize``: a crash never leaves a
dataset that looks complete.

This module needs only numpy, so tokenizing worker processes can import it cheaply.
"""

from __future__ import annotations

import os
import shutil
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

INDEX_HEADER = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
# megatron.core.datasets.indexed_dataset.DType codes.
DTYPE_CODES = {
    np.dtype(np.uint8): 1,
    np.dtype(np.int8): 2,
    np.dtype(np.int16): 3,
    np.dtype(np.int32): 4,
    np.dtype(np.int64): 5,
    np.dtype(np.float64): 6,
    np.dtype(np.float32): 7,
    np.dtype(np.uint16): 8,
}
_CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}
_HEADER_SIZE = len(INDEX_HEADER) + 8 + 1 + 8 + 8
_CHUNK = 1 << 20  # index entries per read/write when streaming


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65,536), else int32.

    megatron-core's own ``DType.optimal_dtype`` switches to int32 from 65,500 on, which doubles
    the dataset for the common 65,536 vocabulary; ids up to 65,535 fit uint16 exactly.
    """
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.int32)


def idx_path(prefix: str) -> str:
    return prefix + ".idx"


def bin_path(prefix: str) -> str:
    return prefix + ".bin"


@dataclass
class IndexArrays:
    """A dataset's index, memory-mapped from its ``.idx`` file."""

    dtype: np.dtype
    sequence_lengths: np.ndarray  # int32 [num_sequences]
    sequence_pointers: np.ndarray  # int64 [num_sequences], byte offsets into .bin
    document_indices: np.ndarray  # int64 [num_documents + 1]

    @property
    def num_sequences(self) -> int:
        return int(self.sequence_lengths.shape[0])

    @property
    def num_documents(self) -> int:
        return int(self.document_indices.shape[0]) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.sequence_lengths.sum(dtype=np.int64))


def read_index(prefix: str) -> IndexArrays:
    """Memory-map ``{prefix}.idx``; raises ValueError naming the file when it is not one."""
    path = idx_path(prefix)
    if not os.path.isfile(path) or not os.path.isfile(bin_path(prefix)):
        raise ValueError(f"no indexed dataset at prefix {prefix!r} (need .idx and .bin)")
    with open(path, "rb") as f:
        header = f.read(_HEADER_SIZE)
    if len(header) < _HEADER_SIZE or header[: len(INDEX_HEADER)] != INDEX_HEADER:
        raise ValueError(f"{path} is not a Megatron index file (bad magic)")
    offset = len(INDEX_HEADER)
    (version,) = struct.unpack_from("<Q", header, offset)
    (code,) = struct.unpack_from("<B", header, offset + 8)
    num_sequences, num_docs_plus_one = struct.unpack_from("<QQ", header, offset + 9)
    if version != INDEX_VERSION or code not in _CODE_DTYPES:
        raise ValueError(f"{path}: unsupported version {version} or dtype code {code}")
    expected = _HEADER_SIZE + num_sequences * 12 + num_docs_plus_one * 8
    if os.path.getsize(path) < expected:
        raise ValueError(f"{path} is truncated ({os.path.getsize(path)} < {expected} bytes)")
    buffer = np.memmap(path, dtype=np.uint8, mode="r")
    lengths = np.frombuffer(buffer, np.int32, num_sequences, _HEADER_SIZE)
    pointers = np.frombuffer(buffer, np.int64, num_sequences, _HEADER_SIZE + num_sequences * 4)
    documents = np.frombuffer(
        buffer, np.int64, num_docs_plus_one, _HEADER_SIZE + num_sequences * 12
    )
    return IndexArrays(_CODE_DTYPES[code], lengths, pointers, documents)


class IndexedDatasetWriter:
    """Append documents (or whole datasets) and ``finalize`` into ``{prefix}.bin/.idx``.

    A document is one or more sequences; preprocessing writes one sequence per document (or
    one per sentence when a JSON field holds a list of sentences, as Megatron-LM does).
    """

    def __init__(self, prefix: str, dtype: np.dtype | type, buffer_entries: int = _CHUNK):
        self.prefix = prefix
        self.dtype = np.dtype(dtype)
        if self.dtype not in DTYPE_CODES:
            raise ValueError(f"unsupported dataset dtype {self.dtype}")
        Path(prefix).parent.mkdir(parents=True, exist_ok=True)
        self._bin_tmp = bin_path(prefix) + ".tmp"
        self._lengths_tmp = prefix + ".lengths.tmp"
        self._docs_tmp = prefix + ".docs.tmp"
        self._bin = open(self._bin_tmp, "wb")
        self._lengths_file = open(self._lengths_tmp, "wb")
        self._docs_file = open(self._docs_tmp, "wb")
        self._lengths: list[np.ndarray] = []
        self._docs: list[np.ndarray] = []
        self._buffered = 0
        self._buffer_entries = buffer_entries
        self.num_sequences = 0
        self.num_documents = 0
        self.num_tokens = 0
        self._closed = False

    def add_document(self, ids: Sequence[int] | np.ndarray, lengths: Sequence[int] | None = None):
        """One document; ``lengths`` splits it into sequences (default: one sequence)."""
        array = np.asarray(ids, dtype=self.dtype)
        seq_lengths = np.asarray([array.size] if lengths is None else lengths, dtype=np.int32)
        if int(seq_lengths.sum()) != array.size:
            raise ValueError(
                f"sequence lengths sum to {seq_lengths.sum()}, document has {array.size}"
            )
        self.add_batch(array, seq_lengths, np.asarray([seq_lengths.size], dtype=np.int64))

    def add_batch(
        self, ids: np.ndarray, sequence_lengths: np.ndarray, sequences_per_document: np.ndarray
    ) -> None:
        """Many documents at once: flat ids, each sequence's length, each document's count."""
        self._check_open()
        if ids.dtype != self.dtype:
            raise ValueError(f"ids have dtype {ids.dtype}, dataset has {self.dtype}")
        self._bin.write(ids.tobytes(order="C"))
        self._push(
            sequence_lengths.astype(np.int32, copy=False),
            self.num_sequences + np.cumsum(sequences_per_document, dtype=np.int64),
        )
        self.num_tokens += int(ids.size)

    def append_dataset(self, prefix: str) -> None:
        """Append every document of the dataset at ``prefix`` (same dtype) to this one."""
        self._check_open()
        index = read_index(prefix)
        if index.dtype != self.dtype:
            raise ValueError(
                f"cannot append {prefix!r} ({index.dtype}) to a {self.dtype} dataset: "
                "datasets with different dtypes cannot be merged"
            )
        self._bin.flush()
        with open(bin_path(prefix), "rb") as src:
            _copy_file(src, self._bin)
        for start in range(0, index.num_sequences, _CHUNK):
            self._push(np.array(index.sequence_lengths[start : start + _CHUNK]), None)
        docs = index.document_indices
        for start in range(1, docs.shape[0], _CHUNK):
            chunk = docs[start : start + _CHUNK] + (self.num_sequences - index.num_sequences)
            self._docs.append(chunk)
            self._buffered += chunk.size
            self.num_documents += chunk.size
        self.num_tokens += index.num_tokens
        self._maybe_flush()

    def finalize(self) -> tuple[str, str]:
        """Write the index and move both files into place; returns (bin path, idx path)."""
        self._check_open()
        self._flush()
        for f in (self._bin, self._lengths_file, self._docs_file):
            f.close()
        self._closed = True
        itemsize = self.dtype.itemsize
        idx_tmp = idx_path(self.prefix) + ".tmp"
        with open(idx_tmp, "wb") as out:
            out.write(INDEX_HEADER)
            out.write(struct.pack("<Q", INDEX_VERSION))
            out.write(struct.pack("<B", DTYPE_CODES[self.dtype]))
            out.write(struct.pack("<Q", self.num_sequences))
            out.write(struct.pack("<Q", self.num_documents + 1))
            with open(self._lengths_tmp, "rb") as src:
                _copy_file(src, out)
            running = 0
            for lengths in _read_chunks(self._lengths_tmp, np.int32):
                ends = np.cumsum(lengths, dtype=np.int64) * itemsize + running
                starts = np.concatenate([[running], ends[:-1]]).astype(np.int64)
                out.write(starts.tobytes())
                running = int(ends[-1])
            # Document boundaries start with a 0 before the end of each document.
            out.write(np.zeros(1, dtype=np.int64).tobytes())
            with open(self._docs_tmp, "rb") as src:
                _copy_file(src, out)
        os.replace(self._bin_tmp, bin_path(self.prefix))
        os.replace(idx_tmp, idx_path(self.prefix))
        os.remove(self._lengths_tmp)
        os.remove(self._docs_tmp)
        return bin_path(self.prefix), idx_path(self.prefix)

    def abort(self) -> None:
        """Close and delete everything written so far."""
        if not self._closed:
            for f in (self._bin, self._lengths_file, self._docs_file):
                f.close()
            self._closed = True
        for path in (
            self._bin_tmp,
            self._lengths_tmp,
            self._docs_tmp,
            idx_path(self.prefix) + ".tmp",
        ):
            if os.path.exists(path):
                os.remove(path)

    def __enter__(self) -> IndexedDatasetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            if not self._closed:
                self.finalize()
        else:
            self.abort()

    def _push(self, lengths: np.ndarray, document_ends: np.ndarray | None) -> None:
        self._lengths.append(lengths)
        self.num_sequences += int(lengths.size)
        self._buffered += int(lengths.size)
        if document_ends is not None:
            self._docs.append(document_ends)
            self.num_documents += int(document_ends.size)
            self._buffered += int(document_ends.size)
        self._maybe_flush()

    def _maybe_flush(self) -> None:
        if self._buffered >= self._buffer_entries:
            self._flush()

    def _flush(self) -> None:
        for array in self._lengths:
            self._lengths_file.write(array.tobytes())
        for array in self._docs:
            self._docs_file.write(array.astype(np.int64, copy=False).tobytes())
        self._lengths.clear()
        self._docs.clear()
        self._buffered = 0

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"dataset writer for {self.prefix!r} is already finalized")


def merge_datasets(prefixes: Sequence[str], output_prefix: str) -> IndexArrays:
    """Concatenate datasets (same dtype) in the given order into ``output_prefix``."""
    if not prefixes:
        raise ValueError("merge_datasets needs at least one input prefix")
    dtypes = {prefix: read_index(prefix).dtype for prefix in prefixes}
    if len(set(dtypes.values())) != 1:
        raise ValueError(f"datasets to merge have different dtypes: {dtypes}")
    if output_prefix in prefixes:
        raise ValueError(f"output prefix {output_prefix!r} is also an input")
    with IndexedDatasetWriter(output_prefix, dtypes[prefixes[0]]) as writer:
        for prefix in prefixes:
            writer.append_dataset(prefix)
    return read_index(output_prefix)


def _read_chunks(path: str, dtype: type) -> Iterator[np.ndarray]:
    itemsize = np.dtype(dtype).itemsize
    with open(path, "rb") as f:
        while True:
            data = f.read(_CHUNK * itemsize)
            if not data:
                return
            yield np.frombuffer(data, dtype=dtype)


def _copy_file(src, dst) -> None:
    """Copy the rest of ``src`` into ``dst`` (kernel-side copy where the OS allows it)."""
    dst.flush()
    try:
        while os.copy_file_range(src.fileno(), dst.fileno(), 1 << 30) > 0:
            pass
        return
    except (AttributeError, OSError):
        pass
    shutil.copyfileobj(src, dst, 16 << 20)
