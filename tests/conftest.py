"""Fixtures shared across test directories."""

from __future__ import annotations

import numpy as np
import pytest

TOKEN_VOCAB = 256
"""Vocabulary of the ``token_dataset`` fixture (ids 0-2 are special, 2 ends a document)."""


@pytest.fixture(scope="session")
def token_dataset(tmp_path_factory) -> str:
    """A Megatron indexed dataset of 200 documents (20-120 tokens, then EOD id 2) with a learnable
    pattern: each token determines the next. Returns its prefix."""
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = str(tmp_path_factory.mktemp("tokens") / "train_text_document")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    rng = np.random.default_rng(0)
    for _ in range(200):
        start = int(rng.integers(3, TOKEN_VOCAB))
        length = int(rng.integers(20, 120))
        doc = (start + np.arange(length) * 7) % (TOKEN_VOCAB - 3) + 3
        builder.add_document(torch.from_numpy(np.append(doc, 2).astype(np.int64)), [length + 1])
    builder.finalize(prefix + ".idx")
    return prefix
