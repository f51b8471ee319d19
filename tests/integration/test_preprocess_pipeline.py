"""preprocess end to end: text -> indexed dataset -> megatron-core IndexedDataset -> text."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
import torch
import zstandard
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

from megatron_ext.curation.builtin_corpus import write_builtin_corpus
from megatron_ext.data.jsonl_io import BadInputError
from megatron_ext.data.preprocess import preprocess
from megatron_ext.tokenizer import load_tokenizer
from megatron_ext.tokenizer.training import TokenizerTrainingConfig, train_tokenizer

SPECIAL_TEXTS = [
    "東京は日本の首都です。北京是中国的首都。서울은 한국의 수도입니다.",
    "مرحبا بالعالم، هذا نص عربي مع أرقام ١٢٣. שלום עולם, זהו טקסט בעברית.",
    "Emoji 🙂🚀👩‍👩‍👧 and flags 🇫🇷🇯🇵, math ∑∫√, hieroglyph 𓀀",
    "  leading spaces, double  spaces,\ttabs\nand new lines\n\n",
    "Numbers 1234567890; literal <s> </s> <pad> <reserved_0> stay text.",
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("pre")
    write_builtin_corpus(root / "train.jsonl", split="train")
    write_builtin_corpus(root / "heldout.jsonl", split="heldout")
    cfg = TokenizerTrainingConfig(vocab_size=1500, num_threads=1, compare_unbalanced=False)
    train_tokenizer(str(root / "train.jsonl"), root / "tok", cfg)
    texts = [json.loads(line)["text"] for line in open(root / "heldout.jsonl", encoding="utf-8")]
    texts += SPECIAL_TEXTS
    data = root / "docs.jsonl"
    with open(data, "w", encoding="utf-8") as f:
        for i in range(4):  # a few copies so that small chunks make many tasks
            for text in texts:
                f.write(json.dumps({"text": text, "n": i}, ensure_ascii=False) + "\n")
    return root, texts * 4


def read_documents(prefix: str) -> list[list[int]]:
    dataset = IndexedDataset(prefix)
    docs = dataset.document_indices
    return [
        np.concatenate([dataset[j] for j in range(docs[i], docs[i + 1])]).tolist()
        for i in range(len(docs) - 1)
    ]


def file_bytes(prefix: str) -> tuple[bytes, bytes]:
    return tuple(open(prefix + s, "rb").read() for s in (".bin", ".idx"))


@pytest.mark.parametrize("tokenizer_type", ["SentencePieceTokenizer", "HuggingFaceTokenizer"])
def test_round_trip_multilingual(setup, tmp_path, tokenizer_type):
    root, texts = setup
    result = preprocess(
        str(root / "docs.jsonl"),
        str(tmp_path / "out"),
        tokenizer_type,
        str(root / "tok"),
        append_eod=True,
        progress=False,
    )
    assert result.num_docs == len(texts) and result.dtype == "uint16"
    tok = load_tokenizer(tokenizer_type, str(root / "tok"))
    docs = read_documents(str(tmp_path / "out_text_document"))
    assert all(ids[-1] == tok.eod for ids in docs)
    assert [tok.detokenize(ids[:-1]) for ids in docs] == texts  # exact: no normalisation


def test_identical_to_megatron_builder_and_across_workers_and_compression(setup, tmp_path):
    root, texts = setup
    data = (root / "docs.jsonl").read_bytes()
    (tmp_path / "docs.jsonl.gz").write_bytes(gzip.compress(data))
    (tmp_path / "docs.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(data))
    tok = load_tokenizer("SentencePieceTokenizer", str(root / "tok"))
    builder = IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=np.uint16)
    for text in texts:
        ids = tok.tokenize(text) + [tok.eod]
        builder.add_document(torch.tensor(ids), [len(ids)])
    builder.finalize(str(tmp_path / "ref.idx"))
    expected = file_bytes(str(tmp_path / "ref"))
    runs = [("docs.jsonl", 1, 1 << 20, "auto"), ("docs.jsonl", 4, 3000, "fork")]
    runs += [("docs.jsonl", 1, 3000, "auto"), ("docs.jsonl", 3, 3000, "spawn")]
    runs += [("docs.jsonl.gz", 2, 3000, "auto"), ("docs.jsonl.zst", 1, 1 << 20, "auto")]
    for name, workers, chunk, start_method in runs:
        source = root / name if name == "docs.jsonl" else tmp_path / name
        prefix = tmp_path / f"{name}-{workers}-{chunk}"
        result = preprocess(
            str(source),
            str(prefix),
            "SentencePieceTokenizer",
            str(root / "tok"),
            append_eod=True,
            workers=workers,
            chunk_bytes=chunk,
            batch_docs=7,
            progress=False,
            start_method=start_method,
        )
        assert result.num_docs == len(texts)
        assert file_bytes(f"{prefix}_text_document") == expected, (name, workers, start_method)


def test_bad_input_counted_with_file_line_numbers_or_fatal(setup, tmp_path):
    root, texts = setup
    good = (root / "docs.jsonl").read_text(encoding="utf-8").splitlines()
    lines = good[:20] + ["{oops"] + good[20:60] + ['{"text": ""}', "", '{"title": "x"}'] + good[60:]
    data = tmp_path / "mixed.jsonl"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = preprocess(
        str(data),
        str(tmp_path / "ok"),
        "SentencePieceTokenizer",
        str(root / "tok"),
        workers=2,
        chunk_bytes=2000,
        progress=False,
    )
    assert result.num_docs == len(good)
    report = result.bad_input.to_dict()
    assert report["counts"] == {
        "malformed_json": 1,
        "empty_text": 1,
        "blank_line": 1,
        "missing_text_key": 1,
    }
    assert report["first_lines"][str(data)] == {
        "malformed_json": [21],
        "empty_text": [62],
        "blank_line": [63],
        "missing_text_key": [64],
    }
    with pytest.raises(BadInputError, match=r"mixed.jsonl:21: malformed_json"):
        preprocess(
            str(data),
            str(tmp_path / "strict"),
            "SentencePieceTokenizer",
            str(root / "tok"),
            workers=2,
            chunk_bytes=2000,
            strict=True,
            progress=False,
        )
    assert not list(tmp_path.glob("strict*"))  # nothing half-written is left behind


def test_several_keys_and_sentence_lists_follow_megatron(setup, tmp_path):
    root, _ = setup
    records = [
        {"text": ["First sentence.", "Second one, 日本語.", ""], "title": "A title"},
        {"text": "Only one", "title": ["t1", "t2"]},
    ]
    data = tmp_path / "keys.jsonl"
    data.write_text(
        "\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n", encoding="utf-8"
    )
    preprocess(
        str(data),
        str(tmp_path / "k"),
        "SentencePieceTokenizer",
        str(root / "tok"),
        json_keys=["text", "title"],
        append_eod=True,
        progress=False,
    )
    tok = load_tokenizer("SentencePieceTokenizer", str(root / "tok"))
    for key in ("text", "title"):
        builder = IndexedDatasetBuilder(str(tmp_path / f"ref_{key}.bin"), dtype=np.uint16)
        for r in records:
            sentences = r[key] if isinstance(r[key], list) else [r[key]]
            seqs = [ids for ids in (tok.tokenize(s) for s in sentences) if ids]
            seqs[-1] = seqs[-1] + [tok.eod]
            flat = [i for s in seqs for i in s]
            builder.add_document(torch.tensor(flat), [len(s) for s in seqs])
        builder.finalize(str(tmp_path / f"ref_{key}.idx"))
        assert file_bytes(str(tmp_path / f"k_{key}_document")) == file_bytes(
            str(tmp_path / f"ref_{key}")
        )
    assert IndexedDataset(str(tmp_path / "k_text_document")).sequence_lengths.size == 3


def test_int32_when_requested_and_clear_errors(setup, tmp_path):
    root, texts = setup
    result = preprocess(
        str(root / "docs.jsonl"),
        str(tmp_path / "w"),
        "SentencePieceTokenizer",
        str(root / "tok"),
        dtype="int32",
        progress=False,
    )
    dataset = IndexedDataset(str(tmp_path / "w_text_document"))
    assert result.dtype == "int32" and dataset.index.dtype == np.int32
    with pytest.raises(ValueError, match="matches no file"):
        preprocess(
            str(tmp_path / "none*.jsonl"),
            str(tmp_path / "x"),
            "SentencePieceTokenizer",
            str(root / "tok"),
            progress=False,
        )
    with pytest.raises(ValueError, match="tokenizer_type must be one of"):
        preprocess(
            str(root / "docs.jsonl"),
            str(tmp_path / "x"),
            "GPT2BPETokenizer",
            str(root / "tok"),
            progress=False,
        )


def test_training_config_is_checked_against_what_preprocessing_recorded(setup, tmp_path, caplog):
    """The stats file ties a dataset to its tokenizer's ids: a doubled EOD, another EOD id or a
    vocabulary smaller than the ids stop the run before it starts."""
    import logging

    from megatron_ext.config.errors import ConfigError
    from megatron_ext.config.loader import load_config
    from megatron_ext.data.provenance import dataset_problems, preprocess_stats
    from megatron_ext.training.experiment import ExperimentConfig, validate_experiment

    root, _ = setup
    for append_eod in (True, False):
        preprocess(
            str(root / "docs.jsonl"),
            str(tmp_path / f"eod_{append_eod}"),
            "SentencePieceTokenizer",
            str(root / "tok"),
            append_eod=append_eod,
            progress=False,
        )
    with_eod, without = (str(tmp_path / f"eod_{flag}_text_document") for flag in (True, False))
    tok = load_tokenizer("SentencePieceTokenizer", str(root / "tok"))
    ids = np.concatenate(read_documents(with_eod))
    stats = preprocess_stats(with_eod)
    assert stats["max_token_id"] == int(ids.max()) and stats["eod_id"] == tok.eod
    assert stats["tokenizer_vocab_size"] == tok.vocab_size == 1500

    def check(prefix: str, *overrides: str) -> list[str]:
        cfg = load_config(ExperimentConfig, None, [f"--data.data_path=[{prefix}]", *overrides])
        return [p.field for p in dataset_problems(cfg.data, cfg.model.vocab_size)]

    fitting = ("--model.vocab_size=1500", f"--data.eod_token_id={tok.eod}")
    assert check(with_eod, *fitting) == []
    assert check(with_eod, *fitting, "--data.append_eod=true") == ["data.append_eod"]
    assert check(with_eod, "--model.vocab_size=1500", "--data.eod_token_id=7") == [
        "data.eod_token_id"
    ]
    assert check(with_eod, f"--model.vocab_size={int(ids.max())}", fitting[1]) == [
        "model.vocab_size"
    ]
    with caplog.at_level(logging.WARNING):
        assert check(without, *fitting) == []
    assert "has no end-of-document tokens and data.append_eod is off" in caplog.text
    assert check(without, *fitting, "--data.append_eod=true") == []
    # Merged datasets: only alike ones, and the result carries the stats on.
    from megatron_ext.data.provenance import merged_stats

    with pytest.raises(ValueError, match="preprocessed differently"):
        merged_stats([with_eod, without])
    merged = merged_stats([with_eod, with_eod])
    assert merged["max_token_id"] == stats["max_token_id"] and merged["append_eod"] is True
    assert merged["num_docs"] == 2 * stats["num_docs"]
    # Part of validate_experiment, which every training run calls first.
    cfg = load_config(
        ExperimentConfig,
        None,
        [f"--data.data_path=[{with_eod}]", *fitting, "--data.append_eod=true"],
    )
    with pytest.raises(ConfigError, match="data.append_eod"):
        validate_experiment(cfg, 1)
