"""Encode text word by word with a cache of each word's ids, kept in flat numpy arrays.

For a tokenizer whose pieces never cross a space (``loading._splits_at_spaces`` checks this for
SentencePiece models), the ids of a text are the ids of its parts cut before each space, put
together. Text repeats words all the time, so each distinct word is encoded once and later
occurrences are looked up.

The cache holds the ids of every remembered word back to back in one int32 array, with each
word's start and length ("entries"). A batch is encoded in a few vectorised steps: split every
text at spaces, map each part to its entry (one dict lookup per word, in C), encode the misses
in one call, and gather the ids of all entries with numpy. No Python list of ids is built per
document.

Two dicts map words to entries: the part before a text's first space is encoded as it is, every
later part with the space in front of it.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import chain, islice, repeat

import numpy as np

EncodeMany = Callable[[list[str]], list[list[int]]]


class WordCache:
    """Encodes batches of texts through ``encode_many`` (a list of texts -> their id lists).

    At most ``max_words`` words are remembered per dict (the first ones seen, which in text
    are mostly the frequent ones); words longer than ``max_word_chars`` characters (runs
    without spaces, such as CJK text, which rarely recur) are encoded every time.
    """

    def __init__(self, encode_many: EncodeMany, max_words: int, max_word_chars: int):
        if max_words < 0 or max_word_chars < 0:
            raise ValueError("max_words and max_word_chars must not be negative")
        self._encode_many = encode_many
        self.max_words = max_words
        self.max_word_chars = max_word_chars
        self._first: dict[str, int] = {}  # part before the first space -> entry
        self._spaced: dict[str, int] = {}  # part after a space -> entry of " " + part
        self._ids = np.zeros(1 << 16, np.int32)
        self._num_ids = 0
        self._starts = np.zeros(1 << 12, np.int64)
        self._lengths = np.zeros(1 << 12, np.int64)
        self._num_entries = 0

    @property
    def num_words(self) -> int:
        """Words remembered (both dicts)."""
        return len(self._first) + len(self._spaced)

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """The ids of all ``texts`` back to back (int32) and each text's id count (int64)."""
        if not texts:
            return np.zeros(0, np.int32), np.zeros(0, np.int64)
        kept_entries, kept_ids = self._num_entries, self._num_ids
        parts = [text.split(" ") for text in texts]
        words_per_text = np.fromiter(map(len, parts), np.int64, len(parts))
        firsts = [p[0] for p in parts]
        rest = list(chain.from_iterable(islice(p, 1, None) for p in parts))
        first_entries, new_first = self._lookup(self._first, firsts, "")
        rest_entries, new_spaced = self._lookup(self._spaced, rest, " ")

        entries = np.empty(int(words_per_text.sum()), np.int64)
        text_starts = np.cumsum(words_per_text) - words_per_text
        is_rest = np.ones(entries.size, bool)
        is_rest[text_starts] = False
        entries[text_starts] = first_entries
        entries[is_rest] = rest_entries
        ids = self._gather(entries)
        lengths = np.add.reduceat(self._lengths[entries], text_starts)

        self._remember(kept_entries, kept_ids, new_first, new_spaced)
        return ids, lengths

    def _lookup(
        self, cache: dict[str, int], words: list[str], prefix: str
    ) -> tuple[np.ndarray, list[str]]:
        """Each word's entry, encoding (and adding entries for) the words not cached."""
        entries = np.fromiter(map(cache.get, words, repeat(-1)), np.int64, len(words))
        missing = np.flatnonzero(entries < 0)
        if not missing.size:
            return entries, []
        missing_words = [words[i] for i in missing.tolist()]
        new = list(dict.fromkeys(missing_words))  # distinct, in order of appearance
        first_new = self._append(self._encode_many([prefix + word for word in new]))
        numbered = dict(zip(new, range(first_new, first_new + len(new))))
        entries[missing] = np.fromiter(map(numbered.__getitem__, missing_words), np.int64)
        return entries, new

    def _append(self, encoded: list[list[int]]) -> int:
        """Adds one entry per id list; returns the first new entry."""
        return self._append_arrays(*flatten_ids(encoded))

    def _append_arrays(self, ids: np.ndarray, lengths: np.ndarray) -> int:
        first = self._num_entries
        self._ids = _ensure(self._ids, self._num_ids + ids.size)
        self._starts = _ensure(self._starts, first + lengths.size)
        self._lengths = _ensure(self._lengths, first + lengths.size)
        self._ids[self._num_ids : self._num_ids + ids.size] = ids
        self._starts[first : first + lengths.size] = self._num_ids + np.cumsum(lengths) - lengths
        self._lengths[first : first + lengths.size] = lengths
        self._num_ids += ids.size
        self._num_entries += lengths.size
        return first

    def _gather(self, entries: np.ndarray) -> np.ndarray:
        """The ids of ``entries`` back to back."""
        lengths = self._lengths[entries]
        out_starts = np.cumsum(lengths) - lengths
        shift = np.repeat(self._starts[entries] - out_starts, lengths)
        return self._ids[np.arange(shift.size) + shift]

    def _remember(
        self, kept_entries: int, kept_ids: int, new_first: list[str], new_spaced: list[str]
    ) -> None:
        """Keep the batch's new words that fit in the cache; drop the entries of the others.

        The batch's new entries follow ``kept_entries``: those of ``new_first``, then those of
        ``new_spaced``, in order.
        """
        keep_first = self._keepers(self._first, new_first)
        keep_spaced = self._keepers(self._spaced, new_spaced)
        if keep_first.size + keep_spaced.size < len(new_first) + len(new_spaced):
            # Move the kept entries down over the dropped ones (ids included), in order.
            entries = kept_entries + np.concatenate([keep_first, len(new_first) + keep_spaced])
            ids, lengths = self._gather(entries), self._lengths[entries]
            self._num_entries, self._num_ids = kept_entries, kept_ids
            self._append_arrays(ids, lengths)
        entry = kept_entries
        for cache, words, kept in (
            (self._first, new_first, keep_first),
            (self._spaced, new_spaced, keep_spaced),
        ):
            if kept.size < len(words):
                words = [words[i] for i in kept.tolist()]
            cache.update(zip(words, range(entry, entry + len(words))))
            entry += len(words)

    def _keepers(self, cache: dict[str, int], words: list[str]) -> np.ndarray:
        """Positions in ``words`` of those to remember: short ones, while there is room."""
        room = max(self.max_words - len(cache), 0)
        short = np.fromiter(map(len, words), np.int64, len(words)) <= self.max_word_chars
        return np.flatnonzero(short)[:room]


def flatten_ids(encoded: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Id lists as all ids back to back (int32) and each list's length (int64)."""
    lengths = np.fromiter(map(len, encoded), np.int64, len(encoded))
    return np.fromiter(chain.from_iterable(encoded), np.int32, int(lengths.sum())), lengths


def _ensure(array: np.ndarray, size: int) -> np.ndarray:
    """``array``, or a copy at least twice as large when it holds fewer than ``size`` items."""
    if size <= array.size:
        return array
    grown = np.zeros(max(size, 2 * array.size), array.dtype)
    grown[: array.size] = array
    return grown
