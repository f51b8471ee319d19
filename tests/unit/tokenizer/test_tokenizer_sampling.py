"""Language-balanced sampling: temperature targets, sentence splitting, rare characters."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from megatron_ext.data.jsonl_io import BadInputReport
from megatron_ext.tokenizer.sampling import (
    drop_characters,
    is_heldout,
    rare_characters,
    scan_corpus,
    split_sentences,
    temperature_targets,
    write_sample,
)


def test_alpha_one_keeps_the_natural_mix():
    targets = temperature_targets({"en": 900, "sw": 100}, alpha=1.0, budget=500, max_repeat=1.0)
    assert targets["en"] == pytest.approx(450)
    assert targets["sw"] == pytest.approx(50)


def test_low_alpha_flattens_shares_and_fills_the_budget():
    available = {"en": 9000, "fr": 900, "sw": 100}
    targets = temperature_targets(available, alpha=0.3, budget=5000, max_repeat=4.0)
    assert sum(targets.values()) == pytest.approx(5000)
    shares = {k: v / 5000 for k, v in targets.items()}
    assert shares["sw"] > 100 / 10000 * 5  # a much larger share than its natural 1%
    assert shares["en"] < 0.9
    assert shares["en"] > shares["fr"] > shares["sw"]


def test_capped_languages_give_their_budget_to_the_others():
    # sw would want ~ a third of 10,000 bytes but may only be repeated twice (200 bytes).
    available = {"en": 9000, "fr": 8000, "sw": 100}
    targets = temperature_targets(available, alpha=0.01, budget=10_000, max_repeat=2.0)
    assert targets["sw"] == pytest.approx(200)
    assert targets["en"] + targets["fr"] == pytest.approx(9800)


def test_budget_larger_than_corpus_samples_the_corpus_size():
    targets = temperature_targets({"en": 300, "fr": 100}, alpha=0.5, budget=10**9, max_repeat=4)
    assert sum(targets.values()) == pytest.approx(400)


def test_invalid_alpha_is_rejected():
    with pytest.raises(ValueError, match="alpha"):
        temperature_targets({"en": 1}, alpha=0.0, budget=10, max_repeat=1)


def test_long_lines_are_cut_within_the_byte_limit_and_blank_lines_dropped():
    text = "short line\n\n   \n" + " ".join(["слово"] * 400) + "\n" + "字" * 3000
    pieces = list(split_sentences(text, max_bytes=256))
    assert pieces[0] == "short line"
    assert all(len(p.encode("utf-8")) <= 256 for p in pieces)
    assert all(p.strip() for p in pieces)
    assert "".join(pieces).replace(" ", "") == text.replace("\n", "").replace(" ", "")


def test_heldout_choice_is_stable_and_close_to_the_fraction():
    docs = [f"document number {i}" for i in range(4000)]
    chosen = [is_heldout(d, 0.1) for d in docs]
    assert chosen == [is_heldout(d, 0.1) for d in docs]
    assert 300 < sum(chosen) < 500
    assert not any(is_heldout(d, 0.0) for d in docs)


def test_rare_characters_only_when_the_vocabulary_is_too_small():
    counts = Counter({"a": 1000, "b": 500, **{chr(0x4E00 + i): 1 for i in range(300)}})
    assert rare_characters(counts, 0.9995, max_chars=1000) == set()
    rare = rare_characters(counts, 0.9995, max_chars=50)
    assert "a" not in rare and "b" not in rare and len(rare) == 302 - 50


def test_dropped_characters_become_sentence_breaks(tmp_path):
    path = tmp_path / "sample.txt"
    path.write_text("ab\u4e00cd\n\u4e01\nef\n", encoding="utf-8")
    drop_characters(str(path), {"\u4e00", "\u4e01"})
    assert path.read_text(encoding="utf-8") == "ab\ncd\nef\n"


def test_sample_repeats_small_languages_and_counts_bad_records(tmp_path):
    path = tmp_path / "in.jsonl"
    lines = [json.dumps({"text": f"english text {i}", "source_lang": "en"}) for i in range(20)]
    # The first key a record has wins: curation's identified language, then a source label.
    sw = {"text": "kiswahili maandishi", "lang": "sw", "source_lang": "en"}
    lines += [json.dumps(sw), "{broken"]
    lines += [json.dumps({"text": "no language given"}), json.dumps({"text": "\ud800 x"})]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    report = BadInputReport()
    scan = scan_corpus(
        [str(path)],
        text_key="text",
        lang_keys=["lang", "source_lang"],
        heldout_fraction=0.0,
        heldout_bytes_per_language=0,
        report=report,
    )
    assert report.counts == {"malformed_json": 1, "lone_surrogate": 1}
    assert report.examples[str(path)] == {"malformed_json": [22], "lone_surrogate": [24]}
    assert set(scan.train_bytes) == {"en", "sw", "unknown"}
    out = tmp_path / "sample.txt"
    stats = write_sample(
        [str(path)],
        str(out),
        rates={"en": 0.5, "sw": 3.0, "unknown": 1.0},
        text_key="text",
        lang_keys=["lang", "source_lang"],
        heldout_fraction=0.0,
        max_sentence_bytes=4096,
        seed=0,
    )
    written = out.read_text(encoding="utf-8").splitlines()
    assert written.count("kiswahili maandishi") == 3
    assert stats.sentences_per_language["sw"] == 3
    assert 3 <= stats.sentences_per_language["en"] <= 17
    assert stats.sentences_per_language["unknown"] == 1
