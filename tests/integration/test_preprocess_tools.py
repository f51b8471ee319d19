"""The command-line tools: train_tokenizer -> preprocess_data -> inspect_dataset / merge."""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_ext.curation.builtin_corpus import write_builtin_corpus

TOOLS = Path(__file__).resolve().parents[2] / "tools"


def tool(name: str):
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tools")
    write_builtin_corpus(root / "train.jsonl", split="train")
    write_builtin_corpus(root / "heldout.jsonl", split="heldout")
    rc = tool("train_tokenizer")(
        [
            "--input",
            str(root / "train.jsonl"),
            "--output-dir",
            str(root / "tok"),
            "--vocab-size",
            "1200",
            "--heldout",
            str(root / "heldout.jsonl"),
            "--set",
            "num_threads=1",
        ]
    )
    assert rc == 0
    return root


def test_train_tokenizer_writes_model_hf_files_and_report(workdir):
    names = {p.name for p in (workdir / "tok").iterdir()}
    assert names == {
        "tokenizer.model",
        "tokenizer.vocab",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "tokenizer_report.json",
        "tokenizer_report.md",
    }
    report = json.loads((workdir / "tok" / "tokenizer_report.json").read_text(encoding="utf-8"))
    assert report["vocab_size"] == 1200 and report["config"]["temperature_alpha"] == 0.3
    assert {"en", "zh", "ar", "he"} <= set(report["heldout"])


def test_train_tokenizer_reports_bad_config_without_traceback(workdir, tmp_path, capsys):
    rc = tool("train_tokenizer")(
        [
            "--input",
            str(workdir / "train.jsonl"),
            "--output-dir",
            str(tmp_path / "t"),
            "--set",
            "temperature_alpha=3",
        ]
    )
    assert rc == 1
    assert "temperature_alpha=3" in capsys.readouterr().err


def test_preprocess_inspect_and_merge(workdir, tmp_path, capsys, caplog):
    argv = [
        "--input",
        str(workdir / "*.jsonl"),
        "--output-prefix",
        str(tmp_path / "ds"),
        "--tokenizer-type",
        "HuggingFaceTokenizer",
        "--tokenizer-model",
        str(workdir / "tok"),
        "--append-eod",
        "--workers",
        "2",
        "--partitions",
        "4",
        "--no-progress",
    ]
    assert tool("preprocess_data")(argv) == 0
    out = capsys.readouterr().out
    docs = sum(1 for f in ("train", "heldout") for _ in open(workdir / f"{f}.jsonl"))
    assert f"{docs} documents" in out and "bad input: none" in out
    prefix = str(tmp_path / "ds_text_document")
    assert len(IndexedDataset(prefix)) == docs

    assert tool("inspect_dataset")([prefix, "--tokenizer-model", str(workdir / "tok")]) == 0
    out = capsys.readouterr().out
    first = json.loads(open(workdir / "heldout.jsonl", encoding="utf-8").readline())["text"]
    assert f"documents    {docs}" in out and "length histogram" in out and first[:50] in out

    merged = str(tmp_path / "twice")
    assert tool("merge_datasets")(["--input", prefix, prefix, "--output-prefix", merged]) == 0
    assert len(IndexedDataset(merged)) == 2 * docs

    # Preprocessing into the same prefix again replaces the dataset, and says so.
    with caplog.at_level(logging.WARNING):
        assert tool("preprocess_data")(argv) == 0
    assert f"replacing the existing dataset(s) {prefix}" in caplog.text
    assert len(IndexedDataset(prefix)) == docs


def test_preprocess_errors_are_messages(workdir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\nnot json\n', encoding="utf-8")
    args = [
        "--output-prefix",
        str(tmp_path / "o"),
        "--tokenizer-type",
        "SentencePieceTokenizer",
        "--tokenizer-model",
        str(workdir / "tok"),
        "--no-progress",
    ]
    assert tool("preprocess_data")(["--input", str(bad), "--strict", *args]) == 1
    assert "bad.jsonl:2: malformed_json" in capsys.readouterr().err
    assert tool("preprocess_data")(["--input", str(bad), *args]) == 0
    assert "malformed_json at line(s) 2" in capsys.readouterr().out
    assert tool("preprocess_data")(["--input", str(bad), "--split-sentences", *args]) == 2
    assert tool("inspect_dataset")([str(tmp_path / "missing")]) == 1
    assert "no indexed dataset" in capsys.readouterr().err
