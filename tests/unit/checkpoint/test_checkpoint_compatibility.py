"""A resume that would silently change the run is refused, naming every changed field."""

from __future__ import annotations

import copy
import logging

import pytest

from megatron_ext.checkpoint.compatibility import check_config_change, diff_configs
from megatron_ext.config.errors import ConfigError

SAVED = {
    "run_dir": "runs/a",
    "seed": 1234,
    "model": {"num_layers": 4, "hidden_size": 64},
    "parallel": {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2},
    "data": {"blend": ["0.7", "a", "0.3", "b"], "path": "/data/x"},
    "schedule": {"train_steps": 30, "global_batch_size": 8, "lr": 3e-4},
    "checkpoint": {"interval": 10, "allow_changes": []},
    "monitoring": {"log_interval": 1},
    "training": {"exit_after_steps": None, "eval_interval": 50},
}


def _changed(**edits) -> dict:
    config = copy.deepcopy(SAVED)
    for dotted, value in edits.items():
        node = config
        *parents, leaf = dotted.split("__")
        for part in parents:
            node = node[part]
        node[leaf] = value
    return config


def test_diff_names_dotted_fields():
    current = _changed(model__hidden_size=128, data__blend=["1.0", "a"])
    assert diff_configs(SAVED, current) == {
        "data.blend": (["0.7", "a", "0.3", "b"], ["1.0", "a"]),
        "model.hidden_size": (64, 128),
    }


def test_each_silent_change_is_refused_and_named():
    current = _changed(
        model__hidden_size=128,
        data__blend=["1.0", "a"],
        schedule__train_steps=60,
        schedule__global_batch_size=16,
        schedule__lr=1e-3,
        seed=7,
    )
    with pytest.raises(ConfigError) as info:
        check_config_change(SAVED, current, [], "ckpt/iter_0000010")
    assert sorted(info.value.fields()) == [
        "data.blend",
        "model.hidden_size",
        "schedule.global_batch_size",
        "schedule.lr",
        "schedule.train_steps",
        "seed",
    ]
    assert "ckpt/iter_0000010" in str(info.value)
    assert "allow_changes" in str(info.value)


def test_new_or_removed_fields_count_as_changes():
    current = _changed()
    current["model"]["num_query_groups"] = 2
    del current["schedule"]["lr"]
    with pytest.raises(ConfigError) as info:
        check_config_change(SAVED, current, [], "x")
    assert sorted(info.value.fields()) == ["model.num_query_groups", "schedule.lr"]


def test_fields_added_since_the_checkpoint_pass_at_their_default_only(caplog):
    defaults = _changed(model__num_layers=2, schedule__train_steps=10)
    defaults["model"]["qk_norm"] = False
    defaults["schedule"]["warmup"] = 20
    current = _changed()
    current["model"]["qk_norm"] = False  # added since, at its default
    current["schedule"]["warmup"] = 5  # added since, set by this run
    with pytest.raises(ConfigError) as info:
        check_config_change(SAVED, current, [], "x", defaults=defaults)
    assert info.value.fields() == ["schedule.warmup"]

    current["schedule"]["warmup"] = 20
    with caplog.at_level(logging.WARNING):
        changes = check_config_change(SAVED, current, [], "x", defaults=defaults)
    assert set(changes) == {"model.qk_norm", "schedule.warmup"}
    assert "model.qk_norm: '<absent>' -> False (a field added after" in caplog.text
    # A field removed since is still a change, and an existing field is compared as before.
    del current["schedule"]["lr"]
    current["model"]["num_layers"] = 2  # the default, but the checkpoint says 4
    with pytest.raises(ConfigError) as info:
        check_config_change(SAVED, current, [], "x", defaults=defaults)
    assert sorted(info.value.fields()) == ["model.num_layers", "schedule.lr"]


def test_kernel_choices_and_the_index_cache_may_change():
    saved = _changed()
    saved["model"].update(compile_layers="auto", fused_cross_entropy="auto", wgrad_fusion="off")
    saved["optimizer"] = {"fused_adamw": True}
    saved["data"]["index_cache_dir"] = None
    current = copy.deepcopy(saved)
    current["model"].update(compile_layers="off", fused_cross_entropy="off", wgrad_fusion="on")
    current["optimizer"]["fused_adamw"] = False
    current["data"]["index_cache_dir"] = "/cache"
    assert len(check_config_change(saved, current, [], "x")) == 5


def test_layout_and_output_changes_are_always_allowed(caplog):
    current = _changed(
        parallel__tensor_model_parallel_size=1,
        run_dir="runs/b",
        checkpoint__interval=100,
        monitoring__log_interval=5,
        training__exit_after_steps=100,
    )
    with caplog.at_level(logging.WARNING):
        changes = check_config_change(SAVED, current, [], "x")
    assert set(changes) == {
        "parallel.tensor_model_parallel_size",
        "run_dir",
        "checkpoint.interval",
        "monitoring.log_interval",
        "training.exit_after_steps",
    }
    assert "training.exit_after_steps: None -> 100" in caplog.text
    assert "parallel.tensor_model_parallel_size" in caplog.text
    assert "resharded" in caplog.text


def test_allowed_changes_pass_and_are_logged(caplog):
    current = _changed(schedule__train_steps=60, data__path="/data/y", data__blend=["1", "a"])
    with caplog.at_level(logging.WARNING):
        changes = check_config_change(SAVED, current, ["schedule.train_steps", "data"], "x")
    assert set(changes) == {"schedule.train_steps", "data.path", "data.blend"}
    assert "schedule.train_steps: 30 -> 60" in caplog.text
    assert "allowed by checkpoint.allow_changes" in caplog.text


def test_allowing_a_field_does_not_allow_its_neighbours():
    current = _changed(schedule__train_steps=60, schedule__lr=1e-3)
    with pytest.raises(ConfigError) as info:
        check_config_change(SAVED, current, ["schedule.train_steps"], "x")
    assert info.value.fields() == ["schedule.lr"]
    # A prefix of a name is not a section.
    with pytest.raises(ConfigError):
        check_config_change(SAVED, _changed(schedule__lr=1.0), ["schedule.l"], "x")


def test_finetune_compares_the_model_only():
    current = _changed(schedule__train_steps=60, data__path="/other")
    assert check_config_change(SAVED, current, [], "x", only_sections=("model",)) == {}
    with pytest.raises(ConfigError, match="model.hidden_size"):
        check_config_change(
            SAVED, _changed(model__hidden_size=32), [], "x", only_sections=("model",)
        )
