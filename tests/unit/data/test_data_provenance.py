"""Finding a dataset's preprocessing stats, and merging them, across copies and versions."""

from __future__ import annotations

import json
import shutil

import pytest

from megatron_ext.data.config import DataConfig
from megatron_ext.data.provenance import dataset_problems, merged_stats, preprocess_stats

NEW = {"tokenizer_type": "SentencePieceTokenizer", "tokenizer_vocab_size": 32000, "eod_id": 2}


def _stats(directory, name: str, outputs: dict, **fields) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"outputs": outputs, "append_eod": True, "dtype": "uint16", **fields})
    (directory / f"{name}_preprocess_stats.json").write_text(text, encoding="utf-8")


def test_stats_are_found_by_file_name_after_the_directory_moved(tmp_path, monkeypatch):
    # Recorded with a relative path, in another working directory, then copied elsewhere.
    first = tmp_path / "scratch" / "tokens"
    _stats(first, "web", {"text": "data/tokens/web_text_document"}, max_token_id=70000, **NEW)
    moved = tmp_path / "nvme" / "tokens"
    shutil.copytree(first, moved)
    monkeypatch.chdir(tmp_path)
    stats = preprocess_stats(str(moved / "web_text_document"))
    assert stats is not None and stats["max_token_id"] == 70000
    assert preprocess_stats(str(moved / "other_text_document")) is None
    data = DataConfig(data_path=[str(moved / "web_text_document")], eod_token_id=2)
    assert [p.field for p in dataset_problems(data, 65536)] == ["model.vocab_size"]


def test_merging_stats_of_an_earlier_version_compares_what_both_recorded(tmp_path):
    _stats(tmp_path, "a", {"text": "a_text_document"}, max_token_id=100, **NEW)
    _stats(tmp_path, "b", {"text": "b_text_document"})  # an earlier version: fewer fields
    prefixes = [str(tmp_path / "a_text_document"), str(tmp_path / "b_text_document")]
    merged = merged_stats(prefixes)
    assert merged["max_token_id"] is None  # unknown for b: not claimed
    assert merged["append_eod"] is True and "eod_id" not in merged
    _stats(tmp_path, "c", {"text": "c_text_document"}, max_token_id=5, **{**NEW, "eod_id": 3})
    with pytest.raises(ValueError, match="preprocessed differently"):
        merged_stats([prefixes[0], str(tmp_path / "c_text_document")])
