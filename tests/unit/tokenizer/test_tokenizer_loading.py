"""Loading tokenizers: batch encoding equals one-by-one encoding, errors are clear."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import sentencepiece

from megatron_ext.curation.builtin_corpus import write_builtin_corpus
from megatron_ext.tokenizer import load_tokenizer
from megatron_ext.tokenizer.hf_export import export_hf_tokenizer
from megatron_ext.tokenizer.training import TokenizerTrainingConfig, train_tokenizer
from megatron_ext.tokenizer.word_cache import WordCache

ALPHABET = [*"ab cd  \t\n€😀中文 xé", "  ", "\u3000", "\u00a0", "<s>", "ﬁ", "Ａ", "١٢", "שלום"]


def random_texts(seed: int, count: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 40))) for _ in range(count)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("load")
    write_builtin_corpus(root / "train.jsonl", split="train")
    return root


def test_batches_equal_single_calls_with_the_word_cache(corpus, tmp_path):
    cfg = TokenizerTrainingConfig(vocab_size=1200, num_threads=1, compare_unbalanced=False)
    result = train_tokenizer(str(corpus / "train.jsonl"), tmp_path / "tok", cfg)
    tok = load_tokenizer("SentencePieceTokenizer", result.model_path)
    assert tok._word_cache is not None
    with open(corpus / "train.jsonl", encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f] + random_texts(0, 2000)
    expected = [tok.tokenize(t) for t in texts]
    for _ in range(2):  # cold, then warm cache
        got = [
            ids for i in range(0, len(texts), 97) for ids in tok.tokenize_batch(texts[i : i + 97])
        ]
        assert got == expected


def test_word_cache_that_fills_and_drops_long_words_gives_the_same_ids(corpus, tmp_path):
    cfg = TokenizerTrainingConfig(vocab_size=1200, num_threads=1, compare_unbalanced=False)
    result = train_tokenizer(str(corpus / "train.jsonl"), tmp_path / "tok", cfg)
    tok = load_tokenizer("SentencePieceTokenizer", result.model_path)
    with open(corpus / "train.jsonl", encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f] + random_texts(2, 1000) + ["", " "]
    cache = WordCache(tok._encode_many, max_words=300, max_word_chars=6)
    stored = []
    for start in range(0, len(texts), 61):
        batch = texts[start : start + 61]
        ids, lengths = cache.encode(batch)
        assert ids.dtype == np.int32 and lengths.sum() == ids.size
        assert _split(ids, lengths) == [tok.tokenize(t) for t in batch]
        stored.append((cache.num_words, cache._num_ids))
    # Once both dicts are full the store stops growing: dropped words leave no ids behind.
    when_full = [ids for words, ids in stored if words == 600]
    assert len(when_full) >= 5 and len(set(when_full)) == 1, stored
    assert cache.encode([])[0].size == 0


def _split(ids, lengths):
    return [part.tolist() for part in np.split(ids, np.cumsum(lengths)[:-1])]


def test_normalising_model_skips_the_cache_and_is_not_exported(corpus, tmp_path):
    sample = tmp_path / "sample.txt"
    with open(corpus / "train.jsonl", encoding="utf-8") as f:
        sample.write_text("\n".join(json.loads(line)["text"] for line in f), encoding="utf-8")
    sentencepiece.SentencePieceTrainer.train(
        input=str(sample),
        model_prefix=str(tmp_path / "nfkc"),
        model_type="bpe",
        vocab_size=800,
        normalization_rule_name="nmt_nfkc",
        byte_fallback=True,
        character_coverage=0.98,
        minloglevel=2,
    )
    tok = load_tokenizer("SentencePieceTokenizer", str(tmp_path / "nfkc.model"))
    assert tok._word_cache is None
    texts = random_texts(1, 300)
    assert tok.tokenize_batch(texts) == [tok.tokenize(t) for t in texts]
    with pytest.raises(ValueError, match="identity normalisation"):
        export_hf_tokenizer(tmp_path / "nfkc.model", tmp_path / "hf")


def test_load_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="tokenizer_type must be one of"):
        load_tokenizer("GPT2BPETokenizer", str(tmp_path))
    with pytest.raises(ValueError, match="no model file"):
        load_tokenizer("SentencePieceTokenizer", str(tmp_path))
    with pytest.raises(ValueError, match="does not exist"):
        load_tokenizer("HuggingFaceTokenizer", str(tmp_path / "missing"))


def test_fingerprint_follows_the_tokenizer_not_its_path(corpus, tmp_path):
    import shutil

    cfg = TokenizerTrainingConfig(vocab_size=1200, num_threads=1, compare_unbalanced=False)
    model = train_tokenizer(str(corpus / "train.jsonl"), tmp_path / "tok", cfg).model_path
    copied = tmp_path / "elsewhere" / "tokenizer.model"
    copied.parent.mkdir()
    shutil.copyfile(model, copied)
    spm = load_tokenizer("SentencePieceTokenizer", model).fingerprint()
    assert load_tokenizer("SentencePieceTokenizer", str(copied.parent)).fingerprint() == spm
    smaller = TokenizerTrainingConfig(vocab_size=1000, num_threads=1, compare_unbalanced=False)
    other = train_tokenizer(str(corpus / "train.jsonl"), tmp_path / "tok2", smaller).model_path
    assert load_tokenizer("SentencePieceTokenizer", other).fingerprint() != spm

    export_hf_tokenizer(model, tmp_path / "hf")
    shutil.copytree(tmp_path / "hf", tmp_path / "hf_copy")
    hf = load_tokenizer("HuggingFaceTokenizer", str(tmp_path / "hf")).fingerprint()
    assert load_tokenizer("HuggingFaceTokenizer", str(tmp_path / "hf_copy")).fingerprint() == hf
    assert hf != spm and hf["type"] == "HuggingFaceTokenizer"
