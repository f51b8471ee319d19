"""The training loop's tokenizer check: a tokenizer that does not load, or that disagrees with the
model's vocabulary or the data's end-of-document id, is a configuration error with its fix."""

from __future__ import annotations

import pytest

from megatron_ext.config.errors import ConfigError
from megatron_ext.config.loader import load_config
from megatron_ext.curation.builtin_corpus import write_builtin_corpus
from megatron_ext.tokenizer import load_tokenizer
from megatron_ext.tokenizer.training import TokenizerTrainingConfig, train_tokenizer
from megatron_ext.training.experiment import ExperimentConfig
from megatron_ext.training.loop import _check_tokenizer


@pytest.fixture(scope="module")
def tokenizer_model(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("tok")
    write_builtin_corpus(root / "train.jsonl", split="train")
    cfg = TokenizerTrainingConfig(vocab_size=1200, num_threads=1, compare_unbalanced=False)
    return train_tokenizer(str(root / "train.jsonl"), root / "tok", cfg).model_path


def _cfg(model_path: str, *extra: str) -> ExperimentConfig:
    overrides = [
        "--tokenizer.tokenizer_type=SentencePieceTokenizer",
        f"--tokenizer.tokenizer_model={model_path}",
        *extra,
    ]
    return load_config(ExperimentConfig, None, overrides)


def test_a_missing_tokenizer_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="no model file") as caught:
        _check_tokenizer(_cfg(str(tmp_path / "nope")))
    assert caught.value.fields() == ["tokenizer.tokenizer_model"]


def test_vocabulary_and_eod_mismatches_are_reported_together(tokenizer_model):
    eod = load_tokenizer("SentencePieceTokenizer", tokenizer_model).eod
    cfg = _cfg(tokenizer_model, "--model.vocab_size=1000", f"--data.eod_token_id={eod + 1}")
    with pytest.raises(ConfigError) as caught:
        _check_tokenizer(cfg)
    assert caught.value.fields() == ["model.vocab_size", "data.eod_token_id"]
    assert "set model.vocab_size=1200" in str(caught.value)
    assert f"set data.eod_token_id={eod}" in str(caught.value)
    _check_tokenizer(_cfg(tokenizer_model, "--model.vocab_size=1200", f"--data.eod_token_id={eod}"))
