"""The blended token stream: exact reads, epochs, blend shares, split (megatron_ext.data)."""

from __future__ import annotations

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset, _IndexWriter

from megatron_ext.data import token_stream
from megatron_ext.data.blend import (
    blend_quotas,
    interleave_permutation,
    split_documents,
    stable_permutation,
)
from megatron_ext.data.config import DataConfig
from megatron_ext.data.documents import document_lengths
from megatron_ext.data.token_stream import DocumentSource, TokenStream, build_token_streams

pytestmark = pytest.mark.timeout(120)


def _walk_documents(stream: TokenStream, num_tokens: int) -> tuple[np.ndarray, list[tuple]]:
    """Reference stream built document by document from the files, via ``locate``."""
    files = [IndexedDataset(s.prefix) for s in stream.sources]
    pieces, docs, position = [], [], 0
    while position < num_tokens:
        d, doc, offset = stream.locate(position)
        assert offset == 0, "a document must start where the previous one ended"
        tokens = files[d][doc].astype(np.int64)
        if stream.sources[d].append_eod:
            tokens = np.append(tokens, stream.eod_token_id)
        pieces.append(tokens)
        docs.append((d, doc))
        position += tokens.size
    return np.concatenate(pieces), docs


def test_stream_is_whole_documents_and_every_epoch_is_one_pass(two_datasets):
    prefix_a, prefix_b, docs_a, docs_b = two_datasets
    stream = TokenStream([DocumentSource(prefix_a), DocumentSource(prefix_b)], seed=7)
    epoch_tokens = stream.tokens_per_epoch_nominal
    assert epoch_tokens == sum(map(len, docs_a)) + sum(map(len, docs_b))
    reference, docs = _walk_documents(stream, 3 * epoch_tokens)
    assert np.array_equal(stream.read(0, reference.size), reference)
    # Without weights each epoch is exactly one pass over every document.
    boundaries = np.cumsum([0] + [len((docs_a, docs_b)[d][i]) for d, i in docs])
    for epoch in range(3):
        first = int(np.searchsorted(boundaries, epoch * epoch_tokens))
        last = int(np.searchsorted(boundaries, (epoch + 1) * epoch_tokens))
        assert boundaries[first] == epoch * epoch_tokens
        in_epoch = docs[first:last]
        assert sorted(in_epoch) == sorted(
            [(0, i) for i in range(120)] + [(1, i) for i in range(60)]
        )
    assert docs[: len(docs) // 3] != docs[len(docs) // 3 : 2 * len(docs) // 3]  # reshuffled
    # Arbitrary reads across document and epoch boundaries equal the reference slices.
    rng = np.random.default_rng(0)
    for _ in range(200):
        start = int(rng.integers(0, reference.size - 500))
        count = int(rng.integers(0, 500))
        assert np.array_equal(stream.read(start, count), reference[start : start + count])
    across = epoch_tokens - 3
    assert np.array_equal(stream.read(across, 10), reference[across : across + 10])


def test_unshuffled_single_dataset_is_the_corpus_repeated(make_dataset):
    docs = [np.arange(i * 10, i * 10 + 1 + i % 7) for i in range(30)]
    stream = TokenStream([DocumentSource(make_dataset("c", docs))], shuffle=False)
    corpus = np.concatenate(docs)
    far = 10**9 + 3
    expected = np.resize(np.roll(corpus, -(far % corpus.size)), 2 * corpus.size + 5)
    assert np.array_equal(stream.read(far, expected.size), expected)
    assert stream.epoch_of(far) == far // corpus.size


def test_far_positions_match_neighbouring_reads(two_datasets):
    prefix_a, prefix_b, _, _ = two_datasets
    sources = [DocumentSource(prefix_a), DocumentSource(prefix_b)]
    stream = TokenStream(sources, [0.25, 0.75], seed=3)
    for start in (10**7 + 11, 987_654_321):
        whole = stream.read(start, 3000)
        parts = np.concatenate([stream.read(start + i, 100) for i in range(0, 3000, 100)])
        assert np.array_equal(whole, parts)
        # A second stream object (as after a restart) gives the same tokens.
        again = TokenStream(sources, [0.25, 0.75], seed=3).read(start, 3000)
        assert np.array_equal(whole, again)


def test_blend_weights_give_token_shares_in_every_window(two_datasets):
    prefix_a, prefix_b, _, docs_b = two_datasets
    sources = [DocumentSource(prefix_a), DocumentSource(prefix_b)]
    for weights in ([0.2, 0.8], [0.9, 0.1]):
        stream = TokenStream(sources, weights, seed=5)
        tokens = stream.read(0, 60_000)
        share_a = weights[0] / sum(weights)
        assert abs(np.mean(tokens < 1000) - share_a) < 0.01
        # Interleaved, not one dataset after the other: every window holds its share too
        # (up to two of the longest documents).
        window = 4000
        slack = 2 * max(map(len, docs_b)) / window
        for start in range(0, tokens.size - window, window):
            part = tokens[start : start + window]
            assert abs(np.mean(part < 1000) - share_a) <= slack


def test_seed_changes_order_but_not_content(two_datasets):
    prefix_a, prefix_b, _, _ = two_datasets
    sources = [DocumentSource(prefix_a), DocumentSource(prefix_b)]
    epoch = TokenStream(sources, seed=1).tokens_per_epoch_nominal
    one = TokenStream(sources, seed=1).read(0, epoch)
    same = TokenStream(sources, seed=1).read(0, epoch)
    other = TokenStream(sources, seed=2).read(0, epoch)
    assert np.array_equal(one, same)
    assert not np.array_equal(one, other)
    assert np.array_equal(np.sort(one), np.sort(other))


def test_append_eod_separates_documents(make_dataset):
    docs = [np.array([5, 6, 7]), np.array([8]), np.array([9, 10])]
    source = DocumentSource(make_dataset("e", docs), append_eod=True, eod_token_id=0)
    stream = TokenStream([source], shuffle=False, eod_token_id=0)
    assert stream.read(0, 18).tolist() == [5, 6, 7, 0, 8, 0, 9, 10, 0] * 2


def test_split_is_disjoint_seeded_and_independent_of_training_seed():
    train, valid, test = split_documents(1000, (0.9, 0.08, 0.02), split_seed=3)
    assert (train.size, valid.size, test.size) == (900, 80, 20)
    assert np.array_equal(np.sort(np.concatenate([train, valid, test])), np.arange(1000))
    again = split_documents(1000, (0.9, 0.08, 0.02), split_seed=3)
    assert all(np.array_equal(x, y) for x, y in zip((train, valid, test), again))
    other = split_documents(1000, (0.9, 0.08, 0.02), split_seed=4)
    assert not np.array_equal(valid, other[1])
    assert valid.max() > 900 or valid.min() < 900  # not simply the tail of the corpus


def test_built_streams_keep_train_and_valid_documents_apart(two_datasets):
    prefix_a, prefix_b, _, _ = two_datasets
    config = DataConfig(data_path=[prefix_a, prefix_b], split="80,20", seed=9)
    streams = build_token_streams(config)
    assert streams.valid is not None
    seen = {}
    for name, stream in (("train", streams.train), ("valid", streams.valid)):
        _, docs = _walk_documents(stream, stream.tokens_per_epoch_nominal)
        seen[name] = {(stream.sources[d].prefix, doc) for d, doc in docs}
    assert not seen["train"] & seen["valid"]
    assert len(seen["train"]) + len(seen["valid"]) == 180
    # The training seed does not move documents between train and valid.
    other = build_token_streams(DataConfig(data_path=[prefix_a, prefix_b], split="80,20", seed=1))
    assert [s.document_ids.tolist() for s in other.valid.sources] == [
        s.document_ids.tolist() for s in streams.valid.sources
    ]


def test_blend_quotas_and_interleave_rules():
    assert blend_quotas([100, 300], None) == [100, 300]
    assert blend_quotas([100, 300], [3, 1]) == [300, 100]
    with pytest.raises(ValueError, match="less than one token"):
        blend_quotas([1, 10**6], [1e-9, 1.0])
    # dataset 0: documents 0, 1 of the concatenation; dataset 1: documents 2..5
    merged = interleave_permutation([np.array([10, 10]), np.array([5, 5, 5, 5])])
    assert merged.tolist() == [2, 0, 3, 4, 1, 5]


@pytest.mark.parametrize("chunk", [1, 3, 1 << 20])
def test_interleave_is_the_merge_by_midpoint_fraction(chunk):
    # Reference: every document's (fraction, dataset, position) sorted lexicographically;
    # zero-length documents and an empty dataset make ties and gaps.
    rng = np.random.default_rng(3)
    datasets = [rng.integers(0, 9, size) for size in (40, 0, 17, 63)]
    datasets[2][:] = 0  # a dataset of only empty documents: every fraction is 0
    rows = []
    for d, lengths in enumerate(datasets):
        total = int(lengths.sum())
        before = np.cumsum(lengths) - lengths
        for i, (b, n) in enumerate(zip(before, lengths)):
            rows.append(((b + 0.5 * n) / total if total else 0.0, d, i))
    offsets = np.concatenate([[0], np.cumsum([len(x) for x in datasets])])
    expected = [offsets[d] + i for _, d, i in sorted(rows)]
    assert interleave_permutation(datasets, chunk).tolist() == expected


def test_epoch_build_in_small_chunks_equals_one_chunk(two_datasets, make_dataset, monkeypatch):
    # Three datasets, weighted so that one repeats within an epoch and one spans several.
    third = make_dataset("c", [np.arange(n) for n in np.random.default_rng(4).integers(1, 9, 50)])
    sources = [DocumentSource(p) for p in (two_datasets[0], two_datasets[1], third)]

    def epochs() -> list[dict[str, np.ndarray]]:
        stream = TokenStream(sources, [5.0, 1.0, 0.4], seed=9)
        return [stream._build_epoch(e).arrays for e in range(4)]

    whole = epochs()
    monkeypatch.setattr(token_stream, "_BUILD_CHUNK", 7)
    for a, b in zip(whole, epochs()):
        assert a.keys() == b.keys()
        for name in a:
            assert a[name].dtype == b[name].dtype
            np.testing.assert_array_equal(a[name], b[name])


def test_missing_dataset_and_empty_split_are_clear_errors(tmp_path, make_dataset):
    with pytest.raises(ValueError, match="not found"):
        DocumentSource(str(tmp_path / "nope"))
    prefix = make_dataset("one", [np.array([1, 2, 3])])
    with pytest.raises(ValueError, match="holds no tokens"):
        TokenStream([DocumentSource(prefix, np.zeros(0, dtype=np.int64))])


def test_document_order_is_pinned_across_numpy_versions():
    # The data order of a run must not change when numpy is upgraded between resumes:
    # these values come from numpy's frozen legacy RandomState stream.
    assert stable_permutation(10, (1234, 0, 0)).tolist() == [0, 2, 5, 3, 4, 1, 7, 6, 8, 9]
    assert stable_permutation(10, (1234, 0, 1)).tolist() == [2, 8, 7, 4, 6, 0, 1, 9, 3, 5]


def test_blended_epoch_is_pinned(make_dataset):
    # The merged order must not change between versions of this code either (a resumed run
    # and the index entries already on disk depend on it); values as the earlier, lexsort-based
    # merge produced them.
    a = make_dataset("a", [np.arange(n) for n in (3, 1, 4, 1, 5, 9, 2, 6)])
    b = make_dataset("b", [np.arange(n) for n in (5, 3, 5, 8, 9, 7)])
    stream = TokenStream([DocumentSource(a), DocumentSource(b)], [2.0, 1.0], seed=11)
    epoch = stream._build_epoch(1).arrays
    assert epoch["dataset_ids"].tolist() == [0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 1, 0, 0]
    assert epoch["local_docs"].tolist() == [1, 6, 1, 2, 0, 3, 7, 4, 0, 7, 6, 1, 2, 4, 5, 4]
    starts = [70, 71, 73, 76, 80, 83, 84, 90, 99, 102, 108, 110, 111, 115, 124, 133, 138]
    assert epoch["starts"].tolist() == starts


def test_document_lengths_of_huge_and_interleaved_sequences(tmp_path):
    # A .idx written by megatron-core's own writer: a sequence of 2**30 uint16 tokens (2 GiB of
    # .bin, whose byte size overflows int32), documents of one and of two sequences. The .bin
    # is never read for lengths.
    prefix = str(tmp_path / "huge")
    writer = _IndexWriter(prefix + ".idx", np.uint16)
    with writer:
        writer.write([2**30, 3, 4, 5], None, [0, 1, 3, 4])
    with open(prefix + ".bin", "wb") as f:
        f.write(bytes(64))
    lengths = document_lengths(IndexedDataset(prefix, mmap=True), prefix)
    assert lengths.tolist() == [2**30, 7, 5]
    # Sequences that are not stored back to back are refused with the fix.
    with open(prefix + ".idx", "r+b") as f:  # move the last sequence's byte offset
        # magic, version, dtype code, sequence and document counts, 4 lengths, 3 offsets
        f.seek(9 + 8 + 1 + 8 + 8 + 4 * 4 + 3 * 8)
        f.write(np.int64(2**31 + 100).tobytes())
    with pytest.raises(ValueError, match="not stored back to back"):
        document_lengths(IndexedDataset(prefix, mmap=True), prefix)
