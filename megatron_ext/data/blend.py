"""Document split and blending arithmetic, kept free of I/O so each rule is easy to test.

* ``split_documents``: a seeded, per-dataset assignment of documents to train / valid / test.
* ``blend_quotas``: how many tokens each dataset contributes to one blended epoch.
* ``interleave_permutation``: the order in which documents of several datasets are merged so that
  every prefix of the blended stream holds each dataset's share of tokens (error below one
  document per dataset). This is the continuous form of the greedy error-minimising interleave
  of Megatron's ``BlendedDataset``, measured in tokens instead of samples, and vectorised.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def split_documents(
    num_documents: int, fractions: tuple[float, float, float], split_seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Document indices (sorted, int64) of the train, valid and test parts.

    The assignment is a seeded permutation, so a corpus written in source or language order
    still gets a representative validation set. It depends only on ``num_documents``, the
    fractions and ``split_seed``: the position of the dataset in ``data_path`` and the training
    seed do not move documents between parts. Part sizes are rounded at cumulative boundaries.
    """
    if num_documents < 0:
        raise ValueError(f"num_documents must be >= 0, got {num_documents}")
    order = stable_permutation(num_documents, (split_seed, num_documents))
    end_train = int(round(fractions[0] * num_documents))
    end_valid = int(round((fractions[0] + fractions[1]) * num_documents))
    end_valid = max(end_train, min(end_valid, num_documents))
    return (
        np.sort(order[:end_train]),
        np.sort(order[end_train:end_valid]),
        np.sort(order[end_valid:]),
    )


def stable_permutation(n: int, key: Sequence[int]) -> np.ndarray:
    """A permutation of ``range(n)`` (int64) determined by ``key`` for good.

    Uses numpy's legacy ``RandomState``, whose streams numpy keeps fixed across versions (the
    newer ``Generator`` may change between versions), seeded through ``SeedSequence``, so that
    a run resumed under another numpy version reads the same data order.
    """
    seed = np.random.SeedSequence([int(k) for k in key]).generate_state(4)
    return np.random.RandomState(seed).permutation(n).astype(np.int64, copy=False)


def blend_quotas(dataset_tokens: Sequence[int], weights: Sequence[float] | None) -> list[int]:
    """Tokens per dataset in one blended epoch.

    The epoch holds as many tokens as all datasets together. Without weights each dataset
    contributes exactly its own size (one pass over everything); with weights dataset ``d``
    contributes ``round(w_d / sum(w) * total)`` tokens, so a dataset weighted above its natural
    share is repeated within the epoch and one weighted below it is spread over several epochs.
    """
    tokens = [int(t) for t in dataset_tokens]
    if any(t <= 0 for t in tokens):
        raise ValueError(f"every dataset needs at least one token, got sizes {tokens}")
    if weights is None:
        return tokens
    if len(weights) != len(tokens):
        raise ValueError(f"{len(weights)} weights for {len(tokens)} datasets")
    total_weight = float(sum(weights))
    if not all(w > 0 for w in weights):
        raise ValueError(f"blend weights must be positive, got {list(weights)}")
    total_tokens = sum(tokens)
    quotas = [int(round(w / total_weight * total_tokens)) for w in weights]
    if any(q <= 0 for q in quotas):
        raise ValueError(
            f"blend weights {list(weights)} give a dataset less than one token per epoch "
            f"(quotas {quotas}); raise its weight or remove it"
        )
    return quotas


def interleave_permutation(
    lengths_per_dataset: Sequence[np.ndarray], chunk: int = 1 << 20
) -> np.ndarray:
    """Merge documents of several datasets by token share; indices into their concatenation.

    ``lengths_per_dataset[d]`` are the lengths of the documents dataset ``d`` contributes, in
    the order they must appear. Each document is placed at the fraction of its dataset's tokens
    that is complete at its midpoint; documents are merged by that fraction (ties: lower dataset
    index first, then earlier document). Returns, for each place of the merged order, the index
    of its document in ``concatenate(lengths_per_dataset)`` (int64).

    Each dataset's fractions are already sorted, so a stable sort of all of them is a merge of
    sorted runs (timsort); the fractions are computed ``chunk`` documents at a time. Memory: the
    8-byte fraction and the 8-byte result per document, and the sort's buffer (at most 4 more).
    """
    sizes = [len(lengths) for lengths in lengths_per_dataset]
    key = np.empty(sum(sizes), dtype=np.float64)
    at = 0
    for lengths, size in zip(lengths_per_dataset, sizes):
        total = int(np.asarray(lengths).sum(dtype=np.int64))
        done = 0  # tokens of this dataset before the current chunk
        for a in range(0, size, chunk):
            part = np.asarray(lengths[a : a + chunk], dtype=np.int64)
            before = np.cumsum(part)
            before += done - part
            done = int(before[-1] + part[-1])
            if total > 0:
                key[at + a : at + a + part.size] = (before + 0.5 * part) / total
            else:
                key[at + a : at + a + part.size] = 0.0
        at += size
    return np.argsort(key, kind="stable")
