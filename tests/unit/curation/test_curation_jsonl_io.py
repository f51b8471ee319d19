"""Streaming JSONL reading/writing with bad-input accounting (megatron_ext.data.jsonl_io)."""

from __future__ import annotations

import json
import os

import pytest

from megatron_ext.data.jsonl_io import (
    BadInputError,
    BadInputReport,
    ShardedJsonlWriter,
    expand_inputs,
    iter_jsonl,
    open_binary,
    open_text,
)


def _write_bytes(path, data: bytes) -> str:
    with open_binary(path, "wb") as handle:
        handle.write(data)
    return str(path)


BAD_FILE = (
    b"\n".join(
        [
            b'{"text": "good one", "id": 1}',
            b"{not json",
            b'{"text": "bad \xff\xfe utf8"}',
            b'{"body": "no text key"}',
            b'{"text": 42}',
            b'{"text": "   "}',
            b"[1, 2, 3]",
            b"",
            b'{"text": "' + b"x" * 500 + b'"}',
            b'{"text": "good two \xc3\xa9", "id": 2}',
        ]
    )
    + b"\n"
)


@pytest.mark.parametrize("suffix", ["", ".gz", ".zst"])
def test_bad_records_are_counted_with_line_numbers(tmp_path, suffix):
    path = _write_bytes(tmp_path / f"in.jsonl{suffix}", BAD_FILE)
    report = BadInputReport()
    records = list(iter_jsonl([path], report=report, max_doc_bytes=200))
    assert [r.text for r in records] == ["good one", "good two é"]
    assert [r.line_number for r in records] == [1, 10]
    assert records[1].record == {"text": "good two é", "id": 2}
    assert report.counts == {
        "malformed_json": 1,
        "invalid_utf8": 1,
        "missing_text_key": 1,
        "non_string_text": 1,
        "empty_text": 1,
        "not_an_object": 1,
        "blank_line": 1,
        "too_large": 1,
    }
    assert report.total == 8
    assert report.examples[path]["invalid_utf8"] == [3]
    assert report.examples[path]["too_large"] == [9]
    summary = report.summary()
    assert "invalid_utf8: 1" in summary and f"{path}: malformed_json at line(s) 2" in summary


def test_strict_raises_naming_file_and_line(tmp_path):
    path = _write_bytes(tmp_path / "in.jsonl", BAD_FILE)
    with pytest.raises(BadInputError, match=r"in\.jsonl:2: malformed_json") as info:
        list(iter_jsonl([path], strict=True))
    assert isinstance(info.value, ValueError) and info.value.line_number == 2


def test_custom_text_key(tmp_path):
    path = _write_bytes(tmp_path / "in.jsonl", b'{"body": "hello"}\n{"text": "ignored"}\n')
    report = BadInputReport()
    assert [r.text for r in iter_jsonl(path, text_key="body", report=report)] == ["hello"]
    assert report.counts == {"missing_text_key": 1}


def test_report_merge_and_round_trip():
    a, b = BadInputReport(max_examples=2), BadInputReport(max_examples=2)
    for line in (7, 3):
        a.add("malformed_json", "f1", line)
    for line in (1, 9):
        b.add("malformed_json", "f1", line)
    b.add("empty_text", "f2", 4)
    a.merge(b)
    assert a.counts == {"malformed_json": 4, "empty_text": 1}
    assert a.examples["f1"]["malformed_json"] == [1, 3]
    again = BadInputReport.from_dict(json.loads(json.dumps(a.to_dict())), max_examples=2)
    assert again.to_dict() == a.to_dict()
    assert BadInputReport().summary() == "bad input: none"


def test_expand_inputs_sorts_dedups_and_names_missing_pattern(tmp_path):
    for name in ("b.jsonl", "a.jsonl", "c.txt"):
        (tmp_path / name).write_text("{}\n")
    pattern = str(tmp_path / "*.jsonl")
    got = expand_inputs([pattern, str(tmp_path / "a.jsonl")])
    assert got == [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]
    missing = str(tmp_path / "nothing*.jsonl")
    with pytest.raises(ValueError, match="nothing"):
        expand_inputs([pattern, missing])
    with pytest.raises(ValueError, match="absent.jsonl"):
        expand_inputs([str(tmp_path / "absent.jsonl")])


@pytest.mark.parametrize("suffix", ["", ".gz", ".zst"])
def test_open_text_round_trip_and_surrogates(tmp_path, suffix):
    path = tmp_path / f"t.txt{suffix}"
    with open_text(path, "w") as handle:
        handle.write("ünïcode line\nsecond\n")
    with open_text(path, "r") as handle:
        assert handle.read() == "ünïcode line\nsecond\n"
    _write_bytes(path, b"ok\nbad \xff\n")
    with open_text(path, "r") as handle:
        lines = handle.read().splitlines()
    assert lines[0] == "ok"
    with pytest.raises(UnicodeEncodeError):
        lines[1].encode("utf-8")


@pytest.mark.parametrize("compression", ["none", "gz", "zst"])
def test_sharded_writer_round_trip_and_determinism(tmp_path, compression):
    records = [{"text": f"doc {i} é", "n": i} for i in range(7)]
    outputs = []
    for run in ("a", "b"):
        with ShardedJsonlWriter(tmp_path / run, "part", compression, 3) as writer:
            for rec in records:
                writer.write(rec)
        outputs.append(writer.paths)
    names = [os.path.basename(p) for p in outputs[0]]
    suffix = {"none": "", "gz": ".gz", "zst": ".zst"}[compression]
    assert names == [f"part-0000{i}.jsonl{suffix}" for i in range(3)]
    assert not [p for p in os.listdir(tmp_path / "a") if p.endswith(".tmp")]
    assert [r.record for r in iter_jsonl(outputs[0])] == records
    for p, q in zip(*outputs):
        with open(p, "rb") as f, open(q, "rb") as g:
            assert f.read() == g.read()


def test_writer_keeps_shard_under_temp_name_until_complete(tmp_path):
    writer = ShardedJsonlWriter(tmp_path, "part", "none", 10)
    writer.write({"text": "a"})
    assert os.listdir(tmp_path) == ["part-00000.jsonl.tmp"]
    writer.close()
    assert os.listdir(tmp_path) == ["part-00000.jsonl"]


def test_writer_leaves_no_shard_on_error(tmp_path):
    """A failure part-way (a full disk, a bad record under strict) leaves no shard: the finished
    ones would pass for the whole output."""
    with pytest.raises(RuntimeError):
        with ShardedJsonlWriter(tmp_path, "part", "gz", 2) as writer:
            for i in range(5):
                writer.write({"text": str(i)})
            assert sorted(os.listdir(tmp_path)) == [
                "part-00000.jsonl.gz",
                "part-00001.jsonl.gz",
                "part-00002.jsonl.gz.tmp",
            ]
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == [] and writer.paths == []
    with pytest.raises(ValueError, match="compression"):
        ShardedJsonlWriter(tmp_path, "x", "bz2")  # type: ignore[arg-type]


def test_empty_writer_writes_nothing(tmp_path):
    with ShardedJsonlWriter(tmp_path / "o", "part") as writer:
        pass
    assert writer.paths == [] and os.listdir(tmp_path / "o") == []


def test_lone_surrogates_are_bad_input_but_pairs_are_text(tmp_path):
    lines = [
        b'{"text": "lone \\ud800 here"}',
        b'{"text": "fine", "meta": "\\udfff"}',
        b'{"text": "emoji \\ud83d\\ude00 pair"}',
        b'{"text": "a literal backslash \\\\ud800 is text"}',
    ]
    path = _write_bytes(tmp_path / "s.jsonl", b"\n".join(lines) + b"\n")
    report = BadInputReport()
    texts = [r.text for r in iter_jsonl(path, report=report)]
    assert texts == ["emoji \U0001f600 pair", "a literal backslash \\ud800 is text"]
    assert report.counts == {"lone_surrogate": 2}
    assert report.examples[path]["lone_surrogate"] == [1, 2]


def test_files_saved_with_a_byte_order_mark_lose_no_record(tmp_path):
    first = _write_bytes(tmp_path / "a.jsonl", b'\xef\xbb\xbf{"text": "one"}\n{"text": "two"}\n')
    second = _write_bytes(tmp_path / "b.jsonl.gz", b'\xef\xbb\xbf{"text": "three"}\n')
    report = BadInputReport()
    texts = [rec.text for rec in iter_jsonl([first, second], "text", report)]
    assert texts == ["one", "two", "three"] and report.total == 0
