"""tools/curate_data.py and tools/train_perplexity_model.py end to end on small inputs."""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

import pytest
import zstandard

from megatron_ext.curation.builtin_corpus import builtin_documents
from megatron_ext.curation.report import STAGES
from megatron_ext.data.jsonl_io import iter_jsonl

ROOT = Path(__file__).resolve().parents[2]
DEMO_CONFIG = str(ROOT / "examples/configs/curation_demo.yaml")


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _lines(records: list[dict]) -> bytes:
    return b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in records)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """Three files (gz, zst, plain) of real text, copies, and bad lines at known places."""
    root = tmp_path_factory.mktemp("inputs")
    docs = [dict(d, meta={"n": i}) for i, d in enumerate(builtin_documents())]
    first, second = docs[: len(docs) // 2], docs[len(docs) // 2 :]
    bad = [b"{broken json\n", b'{"text": "bad \xff utf8"}\n', b'{"other": 1}\n']
    with gzip.open(root / "a.jsonl.gz", "wb") as out:
        out.write(_lines(first[:5]) + bad[0] + _lines(first[5:]))
    with zstandard.open(root / "b.jsonl.zst", "wb") as out:
        out.write(_lines(second) + bad[1] + _lines(first[:3]))  # 3 exact copies across files
    copy = dict(first[10], text=first[10]["text"].replace(" ", "  ").upper())
    (root / "c.jsonl").write_bytes(bad[2] + _lines([copy, {"text": "lorem ipsum " * 20}]))
    return root


def _run(tmp_path: Path, inputs: Path, name: str, workers: int, *extra: str) -> tuple[int, Path]:
    out = tmp_path / name
    argv = [
        "--config",
        DEMO_CONFIG,
        "--input",
        str(inputs / "*.jsonl*"),
        "--output-dir",
        str(out),
        "--workers",
        str(workers),
        "--no-progress",
        "--io.compression=zst",
        "--io.max_records_per_shard=25",
        *extra,
    ]
    return _tool("curate_data").main(argv), out


def test_curation_is_identical_for_any_worker_count(tmp_path, inputs, capsys):
    rc1, out1 = _run(tmp_path, inputs, "w1", 1)
    rc2, out2 = _run(tmp_path, inputs, "w2", 2, "--io.batch_size=16")
    assert rc1 == rc2 == 0
    shards = sorted(p.name for p in out1.glob("curated-*"))
    assert len(shards) >= 3 and all(name.endswith(".jsonl.zst") for name in shards)
    assert shards == sorted(p.name for p in out2.glob("curated-*"))
    for name in shards:
        assert (out1 / name).read_bytes() == (out2 / name).read_bytes(), name
    assert not list(out1.glob("*.tmp")) and not (out1 / ".curation_tmp").exists()

    report = json.loads((out1 / "curation_report.json").read_text("utf-8"))
    assert report["bad_input"]["counts"] == {
        "malformed_json": 1,
        "invalid_utf8": 1,
        "missing_text_key": 1,
    }
    first_lines = report["bad_input"]["first_lines"]
    assert first_lines[str(inputs / "a.jsonl.gz")] == {"malformed_json": [6]}
    assert first_lines[str(inputs / "c.jsonl")] == {"missing_text_key": [1]}
    stages = report["stages"]
    for before, after in zip(STAGES, STAGES[1:]):
        assert stages[before]["total"]["docs_out"] == stages[after]["total"]["docs_in"], after
    assert stages["exact_dedup"]["total"]["removed"] == {"exact_duplicate": 4}
    assert stages["quality"]["total"]["removed"].get("lorem_ipsum") == 1
    assert report["docs_written"] == stages["perplexity"]["total"]["docs_out"] > 80
    assert "kept per language" in (out1 / "curation_report.txt").read_text("utf-8")
    assert "curation: read" in capsys.readouterr().out

    records = [r.record for r in iter_jsonl(sorted(str(p) for p in out1.glob("curated-*")))]
    assert len(records) == report["docs_written"]
    assert len({r["doc_id"] for r in records}) == len(records)
    for rec in records:
        assert {
            "text",
            "source_lang",
            "source",
            "meta",
            "lang",
            "lang_score",
            "perplexity",
            "ppl_bucket",
            "doc_id",
        } <= set(rec)
    assert [r["meta"]["n"] for r in records] == sorted(r["meta"]["n"] for r in records)


def test_strict_mode_fails_cleanly(tmp_path, inputs, capsys):
    rc, out = _run(tmp_path, inputs, "strict", 1, "--strict")
    assert rc == 2
    err = capsys.readouterr().err
    assert "a.jsonl.gz:6: malformed_json" in err and "Traceback" not in err
    assert not list(out.glob("curated-*")) and not (out / ".curation_tmp").exists()


def test_refuses_output_dir_with_shards_and_bad_config(tmp_path, inputs, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "curated-00000.jsonl").write_text("{}\n")
    assert (
        _tool("curate_data").main(
            ["--input", str(inputs / "c.jsonl"), "--output-dir", str(out), "--no-progress"]
        )
        == 2
    )
    assert "already holds curated shards" in capsys.readouterr().err
    assert (
        _tool("curate_data").main(
            [
                "--input",
                str(inputs / "c.jsonl"),
                "--output-dir",
                str(tmp_path / "x"),
                "--near_dedup.num_bands=0",
            ]
        )
        == 2
    )
    assert "near_dedup.num_bands" in capsys.readouterr().err
    missing = str(tmp_path / "no_models")
    argv = [
        "--input",
        str(inputs / "c.jsonl"),
        "--output-dir",
        str(tmp_path / "y"),
        "--workers",
        "2",
        "--perplexity.enabled=true",
        f"--perplexity.model_dir={missing}",
    ]
    assert _tool("curate_data").main(argv) == 2
    err = capsys.readouterr().err
    assert "no perplexity model manifest" in err and "Traceback" not in err


def test_train_perplexity_model_tool_feeds_curation(tmp_path, capsys):
    corpus = tmp_path / "ref.jsonl"
    records = [
        {"text": d["text"], "lang": d["source_lang"]} for d in builtin_documents(["en", "fr"])
    ]
    records.append({"text": "no language field here"})
    corpus.write_text("".join(json.dumps(r) + "\n" for r in records), "utf-8")
    models = tmp_path / "models"
    train = _tool("train_perplexity_model")
    assert (
        train.main(
            [
                "--input",
                str(corpus),
                "--output-dir",
                str(models),
                "--order",
                "4",
                "--heldout-every",
                "3",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "missing_lang_key: 1" in printed and "en:" in printed and "fr:" in printed
    assert sorted(p.name for p in models.iterdir()) == ["en.arpa", "fr.arpa", "manifest.json"]

    raw = tmp_path / "raw.jsonl"
    curate = _tool("curate_data")
    assert curate.main(["--write-builtin-corpus", str(raw), "--languages", "en,fr,ru"]) == 0
    out = tmp_path / "curated"
    assert (
        curate.main(
            [
                "--config",
                DEMO_CONFIG,
                "--input",
                str(raw),
                "--output-dir",
                str(out),
                "--no-progress",
                "--perplexity.reference=model_dir",
                f"--perplexity.model_dir={models}",
                "--perplexity.missing_model=drop",
            ]
        )
        == 0
    )
    report = json.loads((out / "curation_report.json").read_text("utf-8"))
    assert report["stages"]["perplexity"]["per_language"]["ru"]["removed"] == {
        "no_perplexity_model": 6
    }
    assert set(report["details"]["perplexity"]["cutoffs"]) == {"en", "fr"}
