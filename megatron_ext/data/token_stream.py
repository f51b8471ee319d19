"""An infinite, blended, deterministic token stream over Megatron indexed datasets.

Documents of every dataset are shuffled per dataset epoch (seeded), the datasets are merged by
their token share (``blend.interleave_order``) and the merged documents are concatenated, epoch
after epoch, into one stream. ``TokenStream.read(start, n)`` returns the tokens at any absolute
position without materialising the stream: each blended epoch is three arrays of the size of its
document count (dataset id, document, start position), built on first use and cached; locating a
position is a ``searchsorted`` (O(log documents)).

Layout of the stream, for datasets ``d`` with per-epoch token quota ``q_d``:

* dataset ``d`` alone is an infinite sequence of documents: its epoch ``p`` is a permutation of
  its documents seeded by ``(seed, d, p)``; ``P_d(k)`` is the token position where its ``k``-th
  document starts;
* blended epoch ``e`` takes from dataset ``d`` the documents that start in
  ``[e * q_d, (e + 1) * q_d)`` of its own sequence, so the blended epoch starts at the closed
  form ``sum_d P_d(first document of d in e)``, which makes any epoch reachable directly.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_ext.data.blend import blend_quotas, interleave_order, split_documents
from megatron_ext.data.config import DataConfig, parse_split

_SPLIT_NAMES = ("train", "valid", "test")


class DocumentSource:
    """The documents of one indexed dataset that belong to one split.

    A document is Megatron's document (a range of sequences in ``document_indices``); its
    sequences are contiguous in the ``.bin`` file, so a document is read as one span.
    """

    def __init__(
        self,
        prefix: str,
        document_ids: np.ndarray | None = None,
        *,
        append_eod: bool = False,
        eod_token_id: int | None = None,
    ) -> None:
        if append_eod and eod_token_id is None:
            raise ValueError("append_eod needs eod_token_id")
        if not IndexedDataset.exists(prefix):
            raise ValueError(f"indexed dataset {prefix!r} not found (expected {prefix}.bin/.idx)")
        self.prefix = prefix
        self.dataset = IndexedDataset(prefix, mmap=True)
        self.append_eod = append_eod
        self.eod_token_id = eod_token_id
        seq_lengths = np.asarray(self.dataset.sequence_lengths, dtype=np.int64)
        doc_index = np.asarray(self.dataset.document_indices, dtype=np.int64)
        _check_contiguous(prefix, self.dataset, seq_lengths)
        cum = np.concatenate([[0], np.cumsum(seq_lengths)])
        all_lengths = cum[doc_index[1:]] - cum[doc_index[:-1]]
        self.num_documents_total = int(all_lengths.size)
        if document_ids is None:
            document_ids = np.arange(all_lengths.size, dtype=np.int64)
        self.document_ids = np.asarray(document_ids, dtype=np.int64)
        self.first_sequence = doc_index[:-1][self.document_ids]
        self.lengths = all_lengths[self.document_ids] + (1 if append_eod else 0)
        self.num_tokens = int(self.lengths.sum())

    def __len__(self) -> int:
        return int(self.document_ids.size)

    def read(self, local_doc: int, offset: int, count: int) -> np.ndarray:
        """``count`` tokens of document ``local_doc`` (index into this source) from ``offset``."""
        stored = int(self.lengths[local_doc]) - (1 if self.append_eod else 0)
        from_file = max(0, min(count, stored - offset))
        parts = []
        if from_file > 0:
            parts.append(
                self.dataset.get(int(self.first_sequence[local_doc]), offset, from_file).astype(
                    np.int64
                )
            )
        if from_file < count:
            assert self.append_eod and offset + count == stored + 1
            parts.append(np.array([self.eod_token_id], dtype=np.int64))
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _check_contiguous(prefix: str, dataset: IndexedDataset, seq_lengths: np.ndarray) -> None:
    pointers = np.asarray(dataset.index.sequence_pointers, dtype=np.int64)
    itemsize = np.dtype(dataset.index.dtype).itemsize
    if pointers.size > 1 and not np.array_equal(
        pointers[1:], pointers[:-1] + seq_lengths[:-1] * itemsize
    ):
        raise ValueError(
            f"{prefix}.idx: sequences are not stored back to back in {prefix}.bin; "
            "rewrite the dataset with tools/preprocess_data.py"
        )


@dataclass
class _Epoch:
    dataset_ids: np.ndarray  # [docs] int64
    local_docs: np.ndarray  # [docs] int64, index into the source
    starts: np.ndarray  # [docs + 1] int64, absolute stream positions


class TokenStream:
    """Blended, shuffled, infinite token stream; thread-safe ``read`` at any position."""

    def __init__(
        self,
        sources: Sequence[DocumentSource],
        weights: Sequence[float] | None = None,
        *,
        seed: int = 1234,
        shuffle: bool = True,
        eod_token_id: int | None = None,
        name: str = "train",
    ) -> None:
        if not sources:
            raise ValueError(f"{name} stream needs at least one dataset")
        empty = [s.prefix for s in sources if s.num_tokens == 0]
        if empty:
            raise ValueError(f"{name} split of {empty} holds no tokens; check data.split")
        self.sources = list(sources)
        self.weights = None if weights is None else [float(w) for w in weights]
        self.seed = seed
        self.shuffle = shuffle
        self.eod_token_id = eod_token_id
        self.name = name
        self.quotas = blend_quotas([s.num_tokens for s in self.sources], self.weights)
        self.tokens_per_epoch_nominal = sum(self.quotas)
        self._lock = threading.Lock()
        self._orders: OrderedDict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._epochs: OrderedDict[int, _Epoch] = OrderedDict()

    # ---- one dataset's own infinite document sequence -------------------------------------
    def _dataset_epoch(self, d: int, p: int) -> tuple[np.ndarray, np.ndarray]:
        """(document order, start offsets [n + 1]) of dataset ``d`` in its own epoch ``p``."""
        key = (d, p)
        cached = self._orders.get(key)
        if cached is not None:
            self._orders.move_to_end(key)
            return cached
        n = len(self.sources[d])
        if self.shuffle:
            order = np.random.default_rng([self.seed, d, p]).permutation(n).astype(np.int64)
        else:
            order = np.arange(n, dtype=np.int64)
        starts = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(self.sources[d].lengths[order], out=starts[1:])
        self._orders[key] = (order, starts)
        if len(self._orders) > 4 * len(self.sources) + 4:
            self._orders.popitem(last=False)
        return order, starts

    def _first_doc_at(self, d: int, target: int) -> tuple[int, int]:
        """(k, P_d(k)) for the first document of dataset ``d`` starting at or after ``target``."""
        source = self.sources[d]
        p, r = divmod(target, source.num_tokens)
        _, starts = self._dataset_epoch(d, p)
        i = int(np.searchsorted(starts[:-1], r, side="left"))
        return p * len(source) + i, p * source.num_tokens + int(starts[i])

    # ---- blended epochs ---------------------------------------------------------------------
    def _epoch_start(self, e: int) -> int:
        return sum(self._first_doc_at(d, e * q)[1] for d, q in enumerate(self.quotas))

    def _epoch_of(self, position: int) -> int:
        e = position // self.tokens_per_epoch_nominal
        while e > 0 and self._epoch_start(e) > position:
            e -= 1
        while self._epoch_start(e + 1) <= position:
            e += 1
        return e

    def _build_epoch(self, e: int) -> _Epoch:
        lengths, locals_ = [], []
        for d, q in enumerate(self.quotas):
            k0, _ = self._first_doc_at(d, e * q)
            k1, _ = self._first_doc_at(d, (e + 1) * q)
            n = len(self.sources[d])
            ks = np.arange(k0, k1, dtype=np.int64)
            local = np.empty(ks.size, dtype=np.int64)
            for p in np.unique(ks // n):
                sel = ks // n == p
                order, _ = self._dataset_epoch(d, int(p))
                local[sel] = order[ks[sel] % n]
            locals_.append(local)
            lengths.append(self.sources[d].lengths[local])
        dataset_ids, positions = interleave_order(lengths)
        local_docs = np.empty(dataset_ids.size, dtype=np.int64)
        doc_lengths = np.empty(dataset_ids.size, dtype=np.int64)
        for d in range(len(self.sources)):
            sel = dataset_ids == d
            local_docs[sel] = locals_[d][positions[sel]]
            doc_lengths[sel] = lengths[d][positions[sel]]
        starts = np.empty(dataset_ids.size + 1, dtype=np.int64)
        starts[0] = self._epoch_start(e)
        np.cumsum(doc_lengths, out=starts[1:])
        starts[1:] += starts[0]
        return _Epoch(dataset_ids, local_docs, starts)

    def _epoch(self, e: int) -> _Epoch:
        with self._lock:
            cached = self._epochs.get(e)
            if cached is None:
                cached = self._build_epoch(e)
                self._epochs[e] = cached
                if len(self._epochs) > 3:
                    self._epochs.popitem(last=False)
            else:
                self._epochs.move_to_end(e)
            return cached

    def epoch_of(self, position: int) -> int:
        """The blended epoch holding token ``position`` (0-based)."""
        with self._lock:
            return self._epoch_of(position)

    # ---- public reading -------------------------------------------------------------------
    def read(self, start_token: int, num_tokens: int) -> np.ndarray:
        """Tokens ``[start_token, start_token + num_tokens)`` of the stream as int64."""
        if start_token < 0 or num_tokens < 0:
            raise ValueError(f"read({start_token}, {num_tokens}): negative position or count")
        out = np.empty(num_tokens, dtype=np.int64)
        filled, position = 0, int(start_token)
        while filled < num_tokens:
            epoch = self._epoch(self.epoch_of(position))
            i = int(np.searchsorted(epoch.starts, position, side="right")) - 1
            while filled < num_tokens and i < epoch.dataset_ids.size:
                offset = position - int(epoch.starts[i])
                take = min(int(epoch.starts[i + 1]) - position, num_tokens - filled)
                if take > 0:
                    source = self.sources[int(epoch.dataset_ids[i])]
                    out[filled : filled + take] = source.read(
                        int(epoch.local_docs[i]), offset, take
                    )
                    filled += take
                    position += take
                i += 1
        return out

    def locate(self, position: int) -> tuple[int, int, int]:
        """(dataset index, document id in its ``.idx``, offset in the document) of a token."""
        epoch = self._epoch(self.epoch_of(position))
        i = int(np.searchsorted(epoch.starts, position, side="right")) - 1
        d = int(epoch.dataset_ids[i])
        doc = int(self.sources[d].document_ids[epoch.local_docs[i]])
        return d, doc, position - int(epoch.starts[i])

    def fingerprint(self) -> dict:
        """What determines the stream's content; a checkpoint stores it to refuse silent changes."""
        return {
            "name": self.name,
            "prefixes": [s.prefix for s in self.sources],
            "documents": [len(s) for s in self.sources],
            "tokens": [s.num_tokens for s in self.sources],
            "weights": self.weights,
            "quotas": list(self.quotas),
            "seed": self.seed,
            "shuffle": self.shuffle,
        }


@dataclass
class TokenStreams:
    """The train stream and (when the split has a validation part) the validation stream."""

    train: TokenStream
    valid: TokenStream | None


def build_token_streams(config: DataConfig) -> TokenStreams:
    """Open the datasets of ``config``, split them and build the train and validation streams."""
    fractions = parse_split(config.split)
    parts: dict[str, list[DocumentSource]] = {name: [] for name in _SPLIT_NAMES}
    for prefix in config.data_path:
        whole = DocumentSource(prefix)
        ids = split_documents(whole.num_documents_total, fractions, config.split_seed)
        for name, part in zip(_SPLIT_NAMES, ids):
            parts[name].append(
                DocumentSource(
                    prefix, part, append_eod=config.append_eod, eod_token_id=config.eod_token_id
                )
            )
    common = dict(seed=config.seed, shuffle=config.shuffle, eod_token_id=config.eod_token_id)
    train = TokenStream(parts["train"], config.blend_weights, name="train", **common)
    valid_sources = parts["valid"]
    valid = None
    if any(s.num_tokens > 0 for s in valid_sources):
        keep = [i for i, s in enumerate(valid_sources) if s.num_tokens > 0]
        weights = None
        if config.blend_weights is not None:
            weights = [config.blend_weights[i] for i in keep]
        valid = TokenStream([valid_sources[i] for i in keep], weights, name="valid", **common)
    return TokenStreams(train=train, valid=valid)
