"""Training the SentencePiece BPE tokenizer, its Hugging Face files and the language report."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import pytest
import sentencepiece

from megatron_ext.config.errors import ConfigError
from megatron_ext.curation.builtin_corpus import write_builtin_corpus
from megatron_ext.data.jsonl_io import BadInputError
from megatron_ext.tokenizer import load_tokenizer
from megatron_ext.tokenizer.training import TokenizerTrainingConfig, train_tokenizer

LANGUAGES = ("en", "fr", "de", "ru", "ar", "he", "hi", "zh", "ja", "ko", "el", "th", "sw", "tr")
EXTRA_TEXTS = [
    "東京は日本の首都です。北京是中国的首都。서울은 한국의 수도입니다.",
    "مرحبا بالعالم، هذا نص عربي. שלום עולם, זהו טקסט בעברית.",
    "Emoji 🙂🚀👩‍👩‍👧 and flags 🇫🇷🇯🇵, math ∑∫√, hieroglyph 𓀀",
    "  leading spaces, double  spaces,\ttabs\nand new lines\n\n",
    "Numbers 1234567890 and 3.14159; literal <s> and </s> and <pad> stay text.",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    write_builtin_corpus(root / "train.jsonl", LANGUAGES, split="train")
    write_builtin_corpus(root / "heldout.jsonl", LANGUAGES, split="heldout")
    return root


@pytest.fixture(scope="module")
def small(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    cfg = TokenizerTrainingConfig(vocab_size=2000, num_threads=1)
    return train_tokenizer(
        str(corpus / "train.jsonl"), out, cfg, heldout_inputs=str(corpus / "heldout.jsonl")
    )


def heldout_texts(corpus) -> list[str]:
    with open(corpus / "heldout.jsonl", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f] + EXTRA_TEXTS


def test_layout_special_ids_and_vocab_size(small):
    names = {p.rsplit("/", 1)[-1] for p in small.hf_files}
    assert names == {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
    sp = sentencepiece.SentencePieceProcessor(model_file=small.model_path)
    assert sp.get_piece_size() == 2000
    assert [sp.id_to_piece(i) for i in range(5)] == [
        "<unk>",
        "<s>",
        "</s>",
        "<pad>",
        "<reserved_0>",
    ]
    assert all(sp.is_control(i) for i in range(4, 12))
    tok = load_tokenizer("SentencePieceTokenizer", small.output_dir)
    assert (tok.vocab_size, tok.bos, tok.eod, tok.pad) == (2000, 1, 2, 3)


def test_round_trip_is_exact_with_byte_fallback_and_split_digits(small, corpus):
    tok = load_tokenizer("SentencePieceTokenizer", small.model_path)
    for text in heldout_texts(corpus):
        assert tok.detokenize(tok.tokenize(text)) == text
    sp = sentencepiece.SentencePieceProcessor(model_file=small.model_path)
    assert all(sp.is_byte(i) for i in sp.encode("𓀀"))  # unseen character: four byte tokens
    assert len(sp.encode("𓀀")) == 4


def test_hugging_face_files_give_the_same_ids(small, corpus):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    texts = heldout_texts(corpus)
    sp = load_tokenizer("SentencePieceTokenizer", small.model_path)
    auto = AutoTokenizer.from_pretrained(small.output_dir)
    fast = PreTrainedTokenizerFast(tokenizer_file=f"{small.output_dir}/tokenizer.json")
    ours = load_tokenizer("HuggingFaceTokenizer", small.output_dir)
    assert (ours.vocab_size, ours.bos, ours.eod, ours.pad) == (2000, 1, 2, 3)
    assert auto.eos_token_id == 2 and auto.pad_token_id == 3 and auto.bos_token_id == 1
    expected = sp.tokenize_batch(texts)
    assert auto(texts)["input_ids"] == expected
    assert [fast.encode(t, add_special_tokens=False) for t in texts[:-1]] == expected[:-1]
    assert ours.tokenize_batch(texts) == expected
    assert [auto.decode(ids) for ids in expected] == texts


def test_report_compares_balanced_and_natural_per_language(small):
    report = small.report
    with open(small.report["inputs"][0].replace("train", "heldout"), encoding="utf-8") as f:
        heldout_languages = {json.loads(line)["source_lang"] for line in f}
    assert set(report["heldout"]) == heldout_languages and len(heldout_languages) >= 10
    for per_tok in report["heldout"].values():
        assert set(per_tok) == {"balanced", "natural"}
        assert per_tok["balanced"]["tokens_per_byte"] > 0
    text = (Path(small.output_dir) / "tokenizer_report.md").read_text(encoding="utf-8")
    assert "| zh |" in text and "balanced tok/word" in text


def test_balancing_helps_small_languages(corpus, tmp_path):
    # English is 40x over-represented; balancing (alpha 0.3) must give the other languages
    # better held-out compression than the natural mix does.
    rows = [json.loads(line) for line in open(corpus / "train.jsonl", encoding="utf-8")]
    english = [r for r in rows if r["source_lang"] == "en"]
    data = tmp_path / "skewed.jsonl"
    with open(data, "w", encoding="utf-8") as f:
        for i in range(40):
            for r in english:
                f.write(json.dumps({**r, "text": f"{r['text']} ({i})"}, ensure_ascii=False) + "\n")
        for r in rows:
            if r["source_lang"] != "en":
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    cfg = TokenizerTrainingConfig(vocab_size=1500, num_threads=1)
    result = train_tokenizer(str(data), tmp_path / "tok", cfg, str(corpus / "heldout.jsonl"))
    others = [v for lang, v in result.report["heldout"].items() if lang != "en"]
    balanced = sum(v["balanced"]["tokens_per_byte"] for v in others) / len(others)
    natural = sum(v["natural"]["tokens_per_byte"] for v in others) / len(others)
    assert balanced < natural
    sample = result.report["sample_bytes"]
    assert sample["balanced"]["sw"] > 2 * sample["natural"]["sw"]


def generated_corpus(path, num_docs: int, seed: int = 0) -> None:
    """Varied synthetic text in five scripts: enough distinct pieces for 65,536 ids."""
    rng = random.Random(seed)
    alphabets = {
        "la": ("bcdfghjklmnprstvwz", "aeiou"),
        "cy": ("бвгджзклмнпрстфхцчшщ", "аеиоуыэюя"),
        "gr": ("βγδζθκλμνξπρστφχψ", "αεηιουω"),
        "de": ("कखगघचछजझटडतथदधनपबभमयरलवशसह", "ािीुूेैोौ"),
        "ha": ("".join(chr(0x4E00 + i) for i in range(600)), ""),
    }
    lexicon = {}
    for lang, (consonants, vowels) in alphabets.items():
        words: set[str] = set()
        while len(words) < 12000:
            syllables = rng.randint(1, 4)
            words.add(
                "".join(
                    rng.choice(consonants) + rng.choice(vowels or [""]) for _ in range(syllables)
                )
            )
        lexicon[lang] = sorted(words)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(num_docs):
            lang = rng.choice(sorted(alphabets))
            words = [rng.choice(lexicon[lang]) for _ in range(rng.randint(20, 80))]
            text = ("" if lang == "ha" else " ").join(words) + f" {rng.randint(0, 99999)}"
            f.write(json.dumps({"text": text, "source_lang": lang}, ensure_ascii=False) + "\n")


def test_default_vocabulary_of_65536_trains_and_matches_hugging_face(tmp_path):
    generated_corpus(tmp_path / "gen.jsonl", 6000)
    cfg = TokenizerTrainingConfig(compare_unbalanced=False, num_threads=2)
    assert cfg.vocab_size == 65536
    result = train_tokenizer(str(tmp_path / "gen.jsonl"), tmp_path / "tok", cfg)
    sp = load_tokenizer("SentencePieceTokenizer", result.model_path)
    hf = load_tokenizer("HuggingFaceTokenizer", result.output_dir)
    assert sp.vocab_size == hf.vocab_size == 65536
    with open(tmp_path / "gen.jsonl", encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for _, line in zip(range(500), f)] + EXTRA_TEXTS
    ids = sp.tokenize_batch(texts)
    assert hf.tokenize_batch(texts) == ids
    assert max(max(i) for i in ids) > 60000  # the top of the vocabulary is in use
    raw = sentencepiece.SentencePieceProcessor(model_file=result.model_path)
    assert raw.encode("2024 31337", out_type=str) == ["2", "0", "2", "4", "▁", *"31337"]
    pieces = [raw.id_to_piece(i) for i in range(raw.get_piece_size()) if not raw.is_byte(i)]
    assert not [p for p in pieces if sum(c.isdigit() for c in p) > 1]  # digits split


def test_invalid_config_lists_every_problem(tmp_path):
    cfg = TokenizerTrainingConfig(vocab_size=100, temperature_alpha=2.0, character_coverage=0.5)
    with pytest.raises(ConfigError) as err:
        train_tokenizer(str(tmp_path / "missing.jsonl"), tmp_path / "tok", cfg)
    assert set(err.value.fields()) == {"vocab_size", "temperature_alpha", "character_coverage"}


def test_bad_input_is_counted_or_fatal_with_strict(corpus, tmp_path):
    data = tmp_path / "mixed.jsonl"
    good = (corpus / "train.jsonl").read_text(encoding="utf-8").splitlines()
    data.write_text(
        "\n".join(good[:3] + ["not json", '{"text": ""}'] + good[3:]) + "\n", encoding="utf-8"
    )
    cfg = TokenizerTrainingConfig(vocab_size=1200, num_threads=1, compare_unbalanced=False)
    result = train_tokenizer(str(data), tmp_path / "tok", cfg)
    assert result.report["bad_input"]["counts"] == {"malformed_json": 1, "empty_text": 1}
    assert result.report["bad_input"]["first_lines"][str(data)]["malformed_json"] == [4]
    with pytest.raises(BadInputError, match=r"mixed.jsonl:4: malformed_json"):
        strict = TokenizerTrainingConfig(vocab_size=1200, strict=True, compare_unbalanced=False)
        train_tokenizer(str(data), tmp_path / "tok2", strict)


def test_too_large_vocabulary_for_the_text_is_a_clear_error(tmp_path):
    data = tmp_path / "tiny.jsonl"
    data.write_text('{"text": "a tiny corpus"}\n' * 5, encoding="utf-8")
    with pytest.raises(ValueError, match="more .*text, or lower vocab_size"):
        train_tokenizer(str(data), tmp_path / "tok", TokenizerTrainingConfig(vocab_size=5000))


def test_a_corpus_without_languages_is_trained_unbalanced_with_a_warning(corpus, tmp_path, caplog):
    rows = [json.loads(line) for line in open(corpus / "train.jsonl", encoding="utf-8")]
    data = tmp_path / "no_language.jsonl"
    data.write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in rows), "utf-8")
    # A broken line in the held-out file is counted with the training input's bad lines.
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text((corpus / "heldout.jsonl").read_text("utf-8") + "{broken\n", "utf-8")
    cfg = TokenizerTrainingConfig(vocab_size=1500, num_threads=1, compare_unbalanced=False)
    with caplog.at_level(logging.WARNING):
        result = train_tokenizer(str(data), tmp_path / "tok", cfg, str(heldout))
    assert "no training record has a language (keys ['lang', 'source_lang'])" in caplog.text
    assert set(result.report["sample_bytes"]["balanced"]) == {"unknown"}
    assert result.report["bad_input"]["counts"] == {"malformed_json": 1}


def test_exported_hugging_face_tokenizer_encodes_as_preprocessing_did(small, tmp_path):
    """A tokenizer whose template adds BOS (as Llama's does): the exported copy encodes prompts
    with the ids training saw, no BOS in front and a literal "<s>" as text."""
    import shutil

    from transformers import AutoTokenizer

    from megatron_ext.convert.run_files import write_hf_tokenizer

    llama_like = tmp_path / "llama_like"
    llama_like.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(Path(small.output_dir) / name, llama_like / name)
    spec = json.loads((llama_like / "tokenizer.json").read_text("utf-8"))
    spec["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [
            {"SpecialToken": {"id": "<s>", "type_id": 0}},
            {"Sequence": {"id": "A", "type_id": 0}},
        ],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}},
    }
    (llama_like / "tokenizer.json").write_text(json.dumps(spec), "utf-8")
    text = "Hello world <s> again"
    trained = load_tokenizer("HuggingFaceTokenizer", str(llama_like)).tokenize(text)
    assert AutoTokenizer.from_pretrained(str(llama_like))(text)["input_ids"] != trained
    exported = tmp_path / "exported"
    exported.mkdir()
    write_hf_tokenizer(llama_like, exported)
    assert AutoTokenizer.from_pretrained(str(exported))(text)["input_ids"] == trained
    config = json.loads((exported / "tokenizer_config.json").read_text("utf-8"))
    assert config["split_special_tokens"] is True and config["add_bos_token"] is False
