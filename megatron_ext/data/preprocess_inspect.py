"""Look inside an indexed dataset: counts, a length histogram and decoded documents."""

from __future__ import annotations

from typing import Any

import numpy as np

from megatron_ext.data.indexed_writer import bin_path, read_index


def dataset_summary(prefix: str, num_bins: int = 10) -> dict[str, Any]:
    """Document, sequence and token counts, and a histogram of document lengths in tokens."""
    index = read_index(prefix)
    docs = index.document_indices
    seq_ends = np.concatenate([[0], np.cumsum(index.sequence_lengths, dtype=np.int64)])
    doc_lengths = seq_ends[docs[1:]] - seq_ends[docs[:-1]]
    summary: dict[str, Any] = {
        "prefix": prefix,
        "dtype": index.dtype.name,
        "num_documents": index.num_documents,
        "num_sequences": index.num_sequences,
        "num_tokens": index.num_tokens,
        "histogram": [],
    }
    if doc_lengths.size:
        summary.update(
            min_length=int(doc_lengths.min()),
            mean_length=float(doc_lengths.mean()),
            max_length=int(doc_lengths.max()),
        )
        top = max(int(doc_lengths.max()), 1)
        edges = np.unique(np.geomspace(1, top + 1, num_bins + 1).astype(np.int64))
        edges = np.concatenate([[0], edges]) if edges[0] > 0 else edges
        counts, edges = np.histogram(doc_lengths, bins=edges)
        summary["histogram"] = [
            (int(lo), int(hi), int(c)) for lo, hi, c in zip(edges[:-1], edges[1:], counts)
        ]
    return summary


def document_ids(prefix: str, document: int) -> np.ndarray:
    """The ids of one document (all its sequences)."""
    index = read_index(prefix)
    if not 0 <= document < index.num_documents:
        raise ValueError(f"document {document} out of range [0, {index.num_documents})")
    first, last = int(index.document_indices[document]), int(index.document_indices[document + 1])
    if first == last:
        return np.zeros(0, dtype=index.dtype)
    start = int(index.sequence_pointers[first])
    count = int(index.sequence_lengths[first:last].sum())
    data = np.memmap(bin_path(prefix), dtype=index.dtype, mode="r")
    return np.array(data[start // index.dtype.itemsize : start // index.dtype.itemsize + count])


def format_summary(summary: dict[str, Any]) -> str:
    lines = [
        f"dataset      {summary['prefix']}",
        f"dtype        {summary['dtype']}",
        f"documents    {summary['num_documents']:,}",
        f"sequences    {summary['num_sequences']:,}",
        f"tokens       {summary['num_tokens']:,}",
    ]
    if summary["histogram"]:
        lines.append(
            f"doc length   min {summary['min_length']:,}  mean {summary['mean_length']:,.1f}  "
            f"max {summary['max_length']:,} tokens"
        )
        lines.append("length histogram (tokens per document):")
        peak = max(c for _, _, c in summary["histogram"]) or 1
        for lo, hi, count in summary["histogram"]:
            bar = "#" * round(40 * count / peak)
            lines.append(f"  [{lo:>8,}, {hi:>8,})  {count:>10,}  {bar}")
    return "\n".join(lines)
