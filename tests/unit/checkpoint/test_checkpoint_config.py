"""The checkpoint section validates every field and loads from YAML."""

from __future__ import annotations

import pytest

from megatron_ext.checkpoint.config import CheckpointConfig
from megatron_ext.config.errors import ConfigError, ProblemCollector
from megatron_ext.config.loader import load_config


def test_defaults_are_valid():
    problems = ProblemCollector()
    CheckpointConfig().validate(problems)
    assert problems.problems == []


def test_every_bad_field_is_reported():
    cfg = CheckpointConfig(interval=-1, keep_last=0, finetune=True, allow_changes=["", ".x"])
    problems = ProblemCollector()
    cfg.validate(problems)
    with pytest.raises(ConfigError) as info:
        problems.raise_if_any()
    assert sorted(info.value.fields()) == [
        "checkpoint.allow_changes[0]",
        "checkpoint.allow_changes[1]",
        "checkpoint.finetune",
        "checkpoint.interval",
        "checkpoint.keep_last",
    ]


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("interval: 1000\nkeep_last: 3\n")
    cfg = load_config(
        CheckpointConfig, path, ["--allow_changes=[schedule.train_steps, data]", "--load=/x"]
    )
    assert cfg.interval == 1000 and cfg.keep_last == 3 and cfg.load == "/x"
    assert cfg.allow_changes == ["schedule.train_steps", "data"]


def test_save_dir_defaults_into_the_run_dir(tmp_path):
    assert CheckpointConfig().resolved_save_dir(tmp_path) == str(tmp_path / "checkpoints")
    assert CheckpointConfig(save_dir="/ckpt").resolved_save_dir(tmp_path) == "/ckpt"
