"""An infinite, blended, deterministic token stream over Megatron indexed datasets.

Documents of every dataset are shuffled per dataset epoch (seeded), the datasets are merged by
their token share (``blend.interleave_permutation``) and the merged documents are concatenated,
epoch after epoch, into one stream. ``TokenStream.read(start, n)`` returns the tokens at any
absolute position without materialising the stream: each blended epoch is three arrays of the
size of its document count (dataset id, document, start position), built on first use and
cached; locating a position is a ``searchsorted`` (O(log documents)).

Layout of the stream, for datasets ``d`` with per-epoch token quota ``q_d``:

* dataset ``d`` alone is an infinite sequence of documents: its epoch ``p`` is a permutation of
  its documents seeded by ``(seed, d, p)``; ``P_d(k)`` is the token position where its ``k``-th
  document starts;
* blended epoch ``e`` takes from dataset ``d`` the documents that start in
  ``[e * q_d, (e + 1) * q_d)`` of its own sequence, so the blended epoch starts at the closed
  form ``sum_d P_d(first document of d in e)``, which makes any epoch reachable directly.

The index arrays (each dataset's order per dataset epoch, each blended epoch) come from an
``IndexCache``: built in memory by default, or written once to a directory and memory-mapped.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

from megatron_ext.data.blend import blend_quotas, interleave_permutation, stable_permutation
from megatron_ext.data.config import DataConfig, parse_split
from megatron_ext.data.documents import SPLIT_NAMES, DocumentSource, index_dtype, split_index
from megatron_ext.data.index_cache import IndexCache, IndexEntry

__all__ = ["DocumentSource", "TokenStream", "TokenStreams", "build_token_streams"]

logger = logging.getLogger(__name__)

# Bytes per training document a process holds when the index is built in memory: ids and
# lengths, one cached order per dataset epoch (up to three), up to three blended epochs.
_IN_MEMORY_BYTES_PER_DOCUMENT = 12 + 3 * 12 + 3 * 14
_IN_MEMORY_WARNING_BYTES = 2 * 2**30
_BUILD_CHUNK = 1 << 20  # documents per step of an epoch build's temporary arrays


@dataclass
class _Epoch:
    dataset_ids: np.ndarray  # [docs] int16
    local_docs: np.ndarray  # [docs] int32 (int64 past 2**31 documents), index into the source
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
        index_cache: IndexCache | None = None,
    ) -> None:
        if not sources or len(sources) >= 2**15:
            raise ValueError(f"{name} stream needs 1 to 32767 datasets, got {len(sources)}")
        empty = [s.prefix for s in sources if s.num_tokens == 0]
        if empty:
            raise ValueError(f"{name} split of {empty} holds no tokens; check data.split")
        self.sources = list(sources)
        self.weights = None if weights is None else [float(w) for w in weights]
        self.seed = seed
        self.shuffle = shuffle
        self.eod_token_id = eod_token_id
        self.name = name
        self.index_cache = index_cache if index_cache is not None else IndexCache()
        self.quotas = blend_quotas([s.num_tokens for s in self.sources], self.weights)
        self.tokens_per_epoch_nominal = sum(self.quotas)
        # Cache locks are held only for dictionary updates, never while building, so readers of
        # a cached epoch are not blocked while the next epoch is being built.
        self._orders_lock = threading.Lock()
        self._orders: OrderedDict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._epochs_lock = threading.Lock()
        self._epochs: OrderedDict[int, Future] = OrderedDict()
        self._background: list[threading.Thread] = []

    # ---- one dataset's own infinite document sequence -------------------------------------
    def _dataset_epoch(self, d: int, p: int) -> tuple[np.ndarray, np.ndarray]:
        """(document order, start offsets [n + 1]) of dataset ``d`` in its own epoch ``p``."""
        key = (d, p)
        with self._orders_lock:
            cached = self._orders.get(key)
            if cached is not None:
                self._orders.move_to_end(key)
                return cached
        index_key = {
            "source": self.sources[d].identity,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "dataset": d,
            "epoch": p,
        }
        entry = self.index_cache.get("order", index_key, lambda: self._build_dataset_epoch(d, p))
        order, starts = entry.arrays["order"], entry.arrays["starts"]
        with self._orders_lock:
            self._orders[key] = (order, starts)
            if len(self._orders) > 3 * len(self.sources) + 3:
                self._orders.popitem(last=False)
        return order, starts

    def _build_dataset_epoch(self, d: int, p: int) -> IndexEntry:
        n = len(self.sources[d])
        if self.shuffle:
            order = stable_permutation(n, (self.seed, d, p)).astype(index_dtype(n))
        else:
            order = np.arange(n, dtype=index_dtype(n))
        starts = _running_starts(self.sources[d].lengths, order, 0)
        return IndexEntry({"order": order, "starts": starts}, {})

    def _first_doc_at(self, d: int, target: int) -> tuple[int, int]:
        """(k, P_d(k)) for the first document of dataset ``d`` starting at or after ``target``."""
        source = self.sources[d]
        p, r = divmod(target, source.num_tokens)
        if r == 0:  # an epoch boundary of the dataset: no need to build its next order
            return p * len(source), target
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

    def _load_epoch(self, e: int) -> _Epoch:
        index_key = {
            "sources": [s.identity for s in self.sources],
            "quotas": list(self.quotas),
            "seed": self.seed,
            "shuffle": self.shuffle,
            "epoch": e,
        }
        entry = self.index_cache.get("epoch", index_key, lambda: self._build_epoch(e))
        return _Epoch(**entry.arrays)

    def _build_epoch(self, e: int) -> IndexEntry:
        """Epoch ``e``'s arrays, in about 30 bytes per document of working memory.

        Each dataset's documents of the epoch are contiguous runs of its epoch orders; they are
        copied once into one array (with their lengths), merged by ``interleave_permutation``,
        and the outputs are filled ``_BUILD_CHUNK`` documents at a time.
        """
        largest = max(len(s) for s in self.sources)
        runs = [self._epoch_documents(d, e) for d in range(len(self.sources))]
        total = sum(k1 - k0 for k0, k1 in runs)
        local_of = np.empty(total, dtype=index_dtype(largest))
        length_of = np.empty(total, dtype=np.result_type(*(s.lengths for s in self.sources)))
        bounds = np.zeros(len(self.sources), dtype=np.int64)  # end of each dataset's part
        at = 0
        for d, (k0, k1) in enumerate(runs):
            n = len(self.sources[d])
            k = k0
            while k < k1:
                p, i = divmod(k, n)
                order, _ = self._dataset_epoch(d, p)
                piece = order[i : i + min(k1 - k, n - i)]
                local_of[at : at + piece.size] = piece
                length_of[at : at + piece.size] = self.sources[d].lengths[piece]
                at += piece.size
                k += piece.size
            bounds[d] = at
        parts = np.concatenate([[0], bounds])
        merged = interleave_permutation(
            [length_of[a:b] for a, b in zip(parts[:-1], parts[1:])], _BUILD_CHUNK
        )
        dataset_ids = np.empty(total, dtype=np.int16)
        local_docs = np.empty(total, dtype=index_dtype(largest))
        for a in range(0, total, _BUILD_CHUNK):
            chunk = merged[a : a + _BUILD_CHUNK]
            dataset_ids[a : a + chunk.size] = np.searchsorted(bounds, chunk, side="right")
            local_docs[a : a + chunk.size] = local_of[chunk]
        starts = _running_starts(length_of, merged, self._epoch_start(e))
        arrays = {"dataset_ids": dataset_ids, "local_docs": local_docs, "starts": starts}
        return IndexEntry(arrays, {})

    def _epoch_documents(self, d: int, e: int) -> tuple[int, int]:
        """``[k0, k1)``: the documents of dataset ``d``'s own sequence in blended epoch ``e``."""
        q = self.quotas[d]
        return self._first_doc_at(d, e * q)[0], self._first_doc_at(d, (e + 1) * q)[0]

    def _epoch(self, e: int) -> _Epoch:
        """Epoch ``e``, built once; concurrent callers wait for the one building it."""
        with self._epochs_lock:
            future = self._epochs.get(e)
            owner = future is None
            if owner:
                future = Future()
                self._epochs[e] = future
                if len(self._epochs) > 3:  # previous, current, next
                    self._epochs.popitem(last=False)
            else:
                self._epochs.move_to_end(e)
        if owner:
            try:
                future.set_result(self._load_epoch(e))
            except BaseException as exc:
                with self._epochs_lock:
                    self._epochs.pop(e, None)
                future.set_exception(exc)
        return future.result()

    def _prepare_next_epoch(self, e: int) -> None:
        """Build epoch ``e`` in a background thread unless it is cached or being built."""
        with self._epochs_lock:
            if e in self._epochs:
                return
        thread = threading.Thread(target=self._epoch, args=(e,), name="epoch-build")
        with self._epochs_lock:
            self._background = [t for t in self._background if t.is_alive()]
            thread.start()
            self._background.append(thread)

    def wait_for_background(self) -> None:
        """Wait until the epochs being built ahead, in background threads, are ready."""
        with self._epochs_lock:
            threads = list(self._background)
        for thread in threads:
            thread.join()

    def prepare_epochs(self, num_epochs: int) -> None:
        """Build (or load) the index of blended epochs ``0 .. num_epochs - 1`` now."""
        for e in range(num_epochs):
            self._epoch(e)

    def epoch_of(self, position: int) -> int:
        """The blended epoch holding token ``position`` (0-based)."""
        return self._epoch_of(position)

    # ---- public reading -------------------------------------------------------------------
    def read(self, start_token: int, num_tokens: int) -> np.ndarray:
        """Tokens ``[start_token, start_token + num_tokens)`` of the stream as int64."""
        if start_token < 0 or num_tokens < 0:
            raise ValueError(f"read({start_token}, {num_tokens}): negative position or count")
        out = np.empty(num_tokens, dtype=np.int64)
        position, end = int(start_token), int(start_token) + int(num_tokens)
        while position < end:
            e = self.epoch_of(position)
            epoch = self._epoch(e)
            assert epoch.starts[0] <= position < epoch.starts[-1], (position, epoch.starts[[0, -1]])
            stop = min(end, int(epoch.starts[-1]))
            first = int(np.searchsorted(epoch.starts, position, side="right")) - 1
            last = int(np.searchsorted(epoch.starts, stop, side="left"))  # docs starting < stop
            docs = slice(first, last)
            piece_start = np.maximum(epoch.starts[docs], position)
            counts = np.minimum(epoch.starts[first + 1 : last + 1], stop) - piece_start
            offsets = piece_start - epoch.starts[docs]
            target = out[position - start_token : stop - start_token]
            ids = epoch.dataset_ids[docs]
            for d in np.unique(ids):
                sel = ids == d
                tokens = self.sources[int(d)].gather(
                    epoch.local_docs[docs][sel], offsets[sel], counts[sel]
                )
                target[np.repeat(sel, counts)] = tokens
            position = stop
            if 2 * (position - epoch.starts[0]) > epoch.starts[-1] - epoch.starts[0]:
                # Past half of the epoch: have the next one ready before it is needed.
                self._prepare_next_epoch(e + 1)
        return out

    def locate(self, position: int) -> tuple[int, int, int]:
        """(dataset index, document id in its ``.idx``, offset in the document) of a token."""
        epoch = self._epoch(self.epoch_of(position))
        i = int(np.searchsorted(epoch.starts, position, side="right")) - 1
        d = int(epoch.dataset_ids[i])
        doc = int(self.sources[d].document_ids[epoch.local_docs[i]])
        return d, doc, position - int(epoch.starts[i])

    def fingerprint(self) -> dict:
        """What determines the stream's content, for comparing two streams (a checkpoint stores
        the datasets' own content fingerprints instead: ``data.fingerprint``)."""
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


def build_token_streams(config: DataConfig, index_cache: IndexCache | None = None) -> TokenStreams:
    """Open the datasets of ``config``, split them and build the train and validation streams.

    The index arrays go to ``config.index_cache_dir`` (memory-mapped) when it is set, else they
    are held in memory; ``index_cache`` overrides that choice.
    """
    if index_cache is None:
        index_cache = IndexCache(config.index_cache_dir)
    fractions = parse_split(config.split)
    parts: dict[str, list[DocumentSource]] = {name: [] for name in SPLIT_NAMES}
    for prefix in config.data_path:
        indices = split_index(prefix, fractions, config.split_seed, config.append_eod, index_cache)
        for name in SPLIT_NAMES:
            parts[name].append(
                DocumentSource(
                    prefix,
                    append_eod=config.append_eod,
                    eod_token_id=config.eod_token_id,
                    index=indices[name],
                )
            )
    _report_index_memory(parts["train"], index_cache)
    common = dict(
        seed=config.seed,
        shuffle=config.shuffle,
        eod_token_id=config.eod_token_id,
        index_cache=index_cache,
    )
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


def _report_index_memory(train_sources: Sequence[DocumentSource], cache: IndexCache) -> None:
    documents = sum(len(s) for s in train_sources)
    estimate = documents * _IN_MEMORY_BYTES_PER_DOCUMENT
    if cache.directory is not None:
        logger.info(
            "data index of %d training documents memory-mapped from %s", documents, cache.directory
        )
    elif estimate > _IN_MEMORY_WARNING_BYTES:
        logger.warning(
            "the data index of %d training documents takes up to %.1f GiB in every process; "
            "set data.index_cache_dir to build it once and memory-map it",
            documents,
            estimate / 2**30,
        )


def _running_starts(lengths: np.ndarray, order: np.ndarray, first: int) -> np.ndarray:
    """``first`` and the running sums of ``lengths[order]`` (int64, ``order.size + 1``).

    Gathered ``_BUILD_CHUNK`` documents at a time, so no full-size temporary is made.
    """
    starts = np.empty(order.size + 1, dtype=np.int64)
    starts[0] = first
    for a in range(0, order.size, _BUILD_CHUNK):
        b = min(a + _BUILD_CHUNK, order.size)
        np.cumsum(lengths[order[a:b]], dtype=np.int64, out=starts[a + 1 : b + 1])
        starts[a + 1 : b + 1] += starts[a]
    return starts
