"""Cutting JSONL into tasks (every line exactly once) and the per-line checks."""

from __future__ import annotations

import gzip
import json

import pytest
import zstandard

from megatron_ext.data.preprocess_reader import BadRecord, iter_task_lines, parse_line, plan_tasks


def lines_of(path, chunk_bytes):
    tasks = list(plan_tasks([str(path)], chunk_bytes))
    assert [t.index for t in tasks] == list(range(len(tasks)))
    return [line for task in tasks for line in iter_task_lines(task)], len(tasks)


@pytest.mark.parametrize("chunk_bytes", [1, 2, 3, 7, 10, 64, 1 << 20])
@pytest.mark.parametrize("ending", [b"\n", b""])
def test_byte_ranges_yield_every_line_once_in_order(tmp_path, chunk_bytes, ending):
    lines = [b"a", b"", b"bb" * 10, b'{"text": "\xe4\xb8\xad\xe6\x96\x87"}', b"c\r", b"", b"dd"]
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"\n".join(lines) + ending)
    got, num_tasks = lines_of(path, chunk_bytes)
    assert got == lines
    assert num_tasks == -(-path.stat().st_size // chunk_bytes)


def test_compressed_inputs_are_read_in_blocks_of_lines(tmp_path):
    lines = [json.dumps({"text": f"line {i} " + "x" * (i % 50)}).encode() for i in range(500)]
    data = b"\n".join(lines) + b"\n"
    (tmp_path / "in.jsonl.gz").write_bytes(gzip.compress(data))
    (tmp_path / "in.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(data))
    for name in ("in.jsonl.gz", "in.jsonl.zst"):
        got, num_tasks = lines_of(tmp_path / name, 1000)
        assert got == lines
        assert num_tasks > 10


def test_empty_file_has_no_tasks(tmp_path):
    (tmp_path / "empty.jsonl").write_bytes(b"")
    assert list(plan_tasks([str(tmp_path / "empty.jsonl")], 100)) == []


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"   ", "blank_line"),
        (b"\xff\xfe{}", "invalid_utf8"),
        (b'{"text": "x"', "malformed_json"),
        (b"[1, 2]", "not_an_object"),
        (b'{"body": "x"}', "missing_text_key"),
        (b'{"text": 5}', "non_string_text"),
        (b'{"text": ["a", 5]}', "non_string_text"),
        (b'{"text": "  \\n "}', "empty_text"),
        (b'{"text": ["", " "]}', "empty_text"),
        (b'{"text": "bad \\ud800 escape"}', "lone_surrogate"),
        (b'{"text": "' + b"y" * 200 + b'"}', "too_large"),
    ],
)
def test_bad_lines_have_a_reason(raw, reason):
    with pytest.raises(BadRecord) as err:
        parse_line(raw, ["text"], max_doc_bytes=100)
    assert err.value.reason == reason


def test_good_lines_give_sentences_per_key():
    raw = json.dumps({"text": "Hello 世界 🙂", "title": ["one", "two"]}).encode()
    assert parse_line(raw + b"\r", ["text", "title"], None) == [["Hello 世界 🙂"], ["one", "two"]]


def test_a_byte_order_mark_is_not_part_of_the_record():
    """Files saved "with BOM" (and such files concatenated) start lines with one."""
    raw = b'\xef\xbb\xbf{"text": "first line of a file"}'
    assert parse_line(raw, ["text"], None) == [["first line of a file"]]
    with pytest.raises(BadRecord) as err:  # a BOM elsewhere is still what it is
        parse_line(b'{"text": "x"}\xef\xbb\xbf', ["text"], None)
    assert err.value.reason == "malformed_json"
