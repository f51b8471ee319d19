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
    "data": {"blend": ["0.7", "a", "0.3", "b"], "path": "/data/x", "data_path": ["/d/a", "/d/b"]},
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


def _fingerprint(documents: int, tokens: int, sha: str) -> dict:
    """A fingerprint as ``data.fingerprint.dataset_fingerprint`` writes it (uint16 tokens)."""
    return {
        "documents": documents,
        "sequences": documents,
        "dtype": "uint16",
        "idx_bytes": 34 + 18 * documents,
        "bin_bytes": 2 * tokens,
        "sha256": sha,
    }


TRAINED_ON = [_fingerprint(100, 5000, "aa"), _fingerprint(50, 9000, "bb")]


def test_the_same_datasets_at_other_paths_resume(caplog):
    current = _changed(data__data_path=["/nvme/a", "/nvme/b"])
    with caplog.at_level(logging.INFO):
        changes = check_config_change(SAVED, current, [], "x", data=(TRAINED_ON, TRAINED_ON))
    assert changes == {}
    assert "the same datasets from another place" in caplog.text
    assert "/nvme/a" in caplog.text
    # Contents are compared dataset for dataset: swapping the two is no move.
    swapped = _changed(data__data_path=["/d/b", "/d/a"])
    with pytest.raises(ConfigError) as info:
        check_config_change(SAVED, swapped, [], "x", data=(TRAINED_ON, TRAINED_ON[::-1]))
    assert info.value.fields() == ["data.data_path", "data.data_path", "data.data_path"]


def test_a_dataset_rewritten_in_place_is_refused_unless_allowed(caplog):
    rewritten = [TRAINED_ON[0], _fingerprint(60, 9100, "cc")]
    with pytest.raises(ConfigError) as info:
        check_config_change(SAVED, _changed(), [], "ckpt/iter_10", data=(TRAINED_ON, rewritten))
    assert info.value.fields() == ["data.data_path"]
    problem = info.value.problems[0]
    assert problem.value == "/d/b"
    assert "dataset 1 holds other data than when the checkpoint ckpt/iter_10" in problem.rule
    assert "(50 documents, 9,000 tokens (uint16) then, 60 documents, 9,100 tokens" in problem.rule
    assert "allow_changes='[data.data_path]'" in problem.fix

    for allowed in (["data.data_path"], ["data"]):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            check_config_change(SAVED, _changed(), allowed, "x", data=(TRAINED_ON, rewritten))
        assert "dataset 1 holds other data" in caplog.text
        assert "allowed by checkpoint.allow_changes" in caplog.text


def test_moved_and_rewritten_is_refused_for_both():
    current = _changed(data__data_path=["/nvme/a", "/nvme/b"], seed=7)
    rewritten = [_fingerprint(100, 5000, "a2"), TRAINED_ON[1]]
    with pytest.raises(ConfigError) as info:
        check_config_change(SAVED, current, [], "x", data=(TRAINED_ON, rewritten))
    assert info.value.fields() == ["data.data_path", "seed", "data.data_path"]
    assert "allow_changes='[data.data_path, seed]'" in info.value.problems[0].fix


def test_without_recorded_fingerprints_paths_alone_decide(caplog):
    with caplog.at_level(logging.WARNING):
        assert check_config_change(SAVED, _changed(), [], "x", data=(None, TRAINED_ON)) == {}
    assert "compared by path only" in caplog.text
    moved = _changed(data__data_path=["/nvme/a", "/nvme/b"])
    with pytest.raises(ConfigError) as info:
        check_config_change(SAVED, moved, [], "x", data=(None, TRAINED_ON))
    assert info.value.fields() == ["data.data_path"]


def test_finetune_does_not_compare_the_data():
    rewritten = [_fingerprint(1, 2, "zz"), _fingerprint(3, 4, "yy")]
    current = _changed(data__data_path=["/other"])
    changes = check_config_change(
        SAVED, current, [], "x", only_sections=("model",), data=(TRAINED_ON, rewritten)
    )
    assert changes == {}


def test_a_load_that_would_pad_the_vocabulary_differently_is_refused():
    from megatron_ext.checkpoint.compatibility import check_padded_vocab, padded_vocab_rows

    model = {"vocab_size": 2100, "make_vocab_size_divisible_by": 128}
    assert padded_vocab_rows(model, 1) == 2176 and padded_vocab_rows(model, 2) == 2304
    check_padded_vocab(2176, model, 1, "x")
    with pytest.raises(ConfigError) as info:
        check_padded_vocab(2176, model, 2, "ckpt/iter_1")
    problem = info.value.problems[0]
    assert "to 2304 rows at TP2, the checkpoint ckpt/iter_1 has 2176" in problem.rule
    assert "make_vocab_size_divisible_by=1088" in problem.fix
    # The value it names pads alike, and changing it is no config change of its own.
    check_padded_vocab(2176, {**model, "make_vocab_size_divisible_by": 1088}, 2, "x")
    changed = _changed(model__make_vocab_size_divisible_by=1088)
    assert set(check_config_change(SAVED, changed, [], "x")) == {
        "model.make_vocab_size_divisible_by"
    }
    # The recipe's 65,536 pads to itself at any TP.
    recipe = {"vocab_size": 65536, "make_vocab_size_divisible_by": 128}
    for tp in (1, 2, 4, 8):
        check_padded_vocab(65536, recipe, tp, "x")
    with pytest.raises(ConfigError, match="a tensor-parallel size that divides 2101"):
        check_padded_vocab(2101, {"vocab_size": 2101, "make_vocab_size_divisible_by": 1}, 2, "x")


def test_fingerprints_of_another_version_fall_back_to_paths(caplog):
    older = [{**f, "version": 0} for f in TRAINED_ON]
    current = [{**f, "version": 1} for f in TRAINED_ON]
    with caplog.at_level(logging.WARNING):
        assert check_config_change(SAVED, _changed(), [], "x", data=(older, current)) == {}
    assert "of another version" in caplog.text
    moved = _changed(data__data_path=["/nvme/a", "/nvme/b"])
    with pytest.raises(ConfigError):
        check_config_change(SAVED, moved, [], "x", data=(older, current))


def test_the_same_tokenizer_at_another_path_resumes(caplog):
    saved = {
        **SAVED,
        "tokenizer": {"tokenizer_type": "SentencePieceTokenizer", "tokenizer_model": "/a/tok"},
    }
    moved = copy.deepcopy(saved)
    moved["tokenizer"]["tokenizer_model"] = "/b/tok"
    ours = {"version": 1, "type": "SentencePieceTokenizer", "sha256": "0" * 64}
    other = {**ours, "sha256": "1" * 64}
    with caplog.at_level(logging.INFO):
        assert check_config_change(saved, moved, [], "x", tokenizer=(ours, dict(ours))) == {}
    assert "the same tokenizer from another place: '/a/tok' -> '/b/tok'" in caplog.text
    # Another tokenizer, or a checkpoint that recorded none: the path decides.
    for recorded in ((ours, other), (None, ours)):
        with pytest.raises(ConfigError) as info:
            check_config_change(saved, moved, [], "x", tokenizer=recorded)
        assert info.value.fields() == ["tokenizer.tokenizer_model"]
    # Another tokenizer under the same path: training goes on (its tokens are in the datasets),
    # with a warning that the export would ship it.
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert check_config_change(saved, saved, [], "ckpt", tokenizer=(ours, other)) == {}
    assert "the tokenizer at '/a/tok' is not the one the checkpoint ckpt" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        check_config_change(saved, saved, [], "ckpt", tokenizer=(ours, dict(ours)))
        check_config_change(saved, saved, [], "ckpt", tokenizer=(None, other))
    assert "tokenizer" not in caplog.text
