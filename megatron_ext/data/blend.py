"""Document split and blending arithmetic, kept free of I/O so each rule is easy to test.

* ``split_documents``: a seeded, per-dataset assignment of documents to train / valid / test.
* ``blend_quotas``: how many tokens each dataset contributes to one blended epoch.
* ``interleave_order``: the order in which documents of several datasets are merged so that
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
    return np.random.RandomState(seed).permutation(n).astype(np.int64)


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


def interleave_order(lengths_per_dataset: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Merge documents of several datasets by token share.

    ``lengths_per_dataset[d]`` are the lengths of the documents dataset ``d`` contributes, in
    the order they must appear. Each document is placed at the fraction of its dataset's tokens
    that is complete at its midpoint; documents are merged by that fraction (ties: lower dataset
    index first). Returns ``(dataset_ids, index_within_dataset)`` of the merged order.
    """
    keys, dataset_ids, positions = [], [], []
    for d, lengths in enumerate(lengths_per_dataset):
        lengths = np.asarray(lengths, dtype=np.int64)
        if lengths.size == 0:
            continue
        total = int(lengths.sum())
        before = np.cumsum(lengths) - lengths
        if total > 0:
            keys.append((before + 0.5 * lengths) / total)
        else:
            keys.append(np.zeros(lengths.size))
        dataset_ids.append(np.full(lengths.size, d, dtype=np.int64))
        positions.append(np.arange(lengths.size, dtype=np.int64))
    if not keys:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    key = np.concatenate(keys)
    ids = np.concatenate(dataset_ids)
    pos = np.concatenate(positions)
    order = np.lexsort((pos, ids, key))
    return ids[order], pos[order]
