"""One test per validation rule: the error names the field, the rule and the fix."""

from __future__ import annotations

import pytest

from megatron_ext.config.errors import ConfigError
from megatron_ext.config.loader import apply_overrides, from_dict, load_config, to_dict
from megatron_ext.training.experiment import ExperimentConfig, validate_experiment

# A valid base: the tiny config's sizes on 8 processes (TP2 x PP2 x DP2).
BASE = [
    "--parallel.tensor_model_parallel_size=2",
    "--parallel.pipeline_model_parallel_size=2",
    "--data.data_path=[unused_prefix]",
]


def _errors(overrides: list[str], world_size: int = 8) -> ConfigError:
    cfg = load_config(ExperimentConfig, None, BASE + overrides)
    with pytest.raises(ConfigError) as info:
        validate_experiment(cfg, world_size, check_files=False)
    return info.value


def test_base_is_valid():
    cfg = load_config(ExperimentConfig, None, BASE)
    validate_experiment(cfg, 8, check_files=False)


RULES = {
    "heads_divisible_by_tp": (
        ["--parallel.tensor_model_parallel_size=8"],
        8,
        "model.num_attention_heads",
        "smaller TP",
    ),
    "groups_divisible_by_tp": (
        ["--model.num_query_groups=1"],
        8,
        "model.num_query_groups",
        "multiple of 2",
    ),
    "groups_divide_heads": (
        [
            "--model.num_query_groups=3",
            "--parallel.tensor_model_parallel_size=1",
            "--parallel.pipeline_model_parallel_size=1",
        ],
        1,
        "model.num_query_groups",
        "divisor",
    ),
    "hidden_divisible_by_heads": (["--model.hidden_size=66"], 8, "model.hidden_size", "multiple"),
    "ffn_divisible_by_tp": (["--model.ffn_hidden_size=175"], 8, "model.ffn_hidden_size", "round"),
    "layers_divisible_by_stages": (
        ["--model.num_layers=5"],
        8,
        "model.num_layers",
        "multiple of 2",
    ),
    "layers_divisible_by_virtual_chunks": (
        ["--parallel.virtual_pipeline_model_parallel_size=4"],
        8,
        "model.num_layers",
        "multiple of 8",
    ),
    "world_size_divisible_by_model_parallel": (
        [],
        6,
        "parallel.tensor_model_parallel_size",
        "divides the number of processes",
    ),
    "degrees_positive": (
        ["--parallel.pipeline_model_parallel_size=0"],
        8,
        "parallel.pipeline_model_parallel_size",
        "1 or more",
    ),
    "virtual_pipeline_needs_stages": (
        [
            "--parallel.pipeline_model_parallel_size=1",
            "--parallel.virtual_pipeline_model_parallel_size=2",
        ],
        4,
        "parallel.virtual_pipeline_model_parallel_size",
        "pipeline_model_parallel_size >= 2",
    ),
    "context_parallel_is_refused": (
        ["--parallel.context_parallel_size=2", "--parallel.tensor_model_parallel_size=1"],
        8,
        "parallel.context_parallel_size",
        "context_parallel_size=1",
    ),
    "interleaved_schedule_needs_microbatches_per_stage": (
        ["--parallel.virtual_pipeline_model_parallel_size=2", "--schedule.global_batch_size=12"],
        8,
        "schedule.global_batch_size",
        "or drop virtual_pipeline_model_parallel_size",
    ),
    "sequence_parallel_splits_every_length": (
        ["--parallel.sequence_parallel=true", "--schedule.curriculum.start_seq_length=63"],
        8,
        "schedule.curriculum.start_seq_length",
        "divisible by 2",
    ),
    "reset_positions_do_nothing_under_rope": (
        ["--data.reset_position_ids=true", "--data.eod_token_id=2"],
        8,
        "data.reset_position_ids",
        "reset_position_ids=false",
    ),
    "recompute_groups_advance": (
        ["--model.recompute_granularity=full", "--model.recompute_num_layers=0"],
        8,
        "model.recompute_num_layers",
        "use 1",
    ),
    "vocab_multiple_positive": (
        ["--model.make_vocab_size_divisible_by=0"],
        8,
        "model.make_vocab_size_divisible_by",
        "use 128",
    ),
    "exit_after_steps_at_least_one": (
        ["--training.exit_after_steps=0"],
        8,
        "training.exit_after_steps",
        "null to run to the end",
    ),
    "eval_iters_non_negative": (["--training.eval_iters=-1"], 8, "training.eval_iters", "0 to"),
    "sequence_parallel_needs_tp": (
        ["--parallel.tensor_model_parallel_size=1", "--parallel.sequence_parallel=true"],
        8,
        "parallel.sequence_parallel",
        "tensor_model_parallel_size >= 2",
    ),
    "param_gather_needs_distributed_optimizer": (
        ["--parallel.use_distributed_optimizer=false", "--parallel.overlap_param_gather=true"],
        8,
        "parallel.overlap_param_gather",
        "use_distributed_optimizer=true",
    ),
    "global_batch_divisible_by_micro_batch_times_dp": (
        ["--schedule.global_batch_size=10", "--schedule.curriculum.enabled=false"],
        8,
        "schedule.global_batch_size",
        "global_batch_size",
    ),
    "sequence_length_within_model_context": (
        ["--schedule.seq_length=256", "--schedule.curriculum.enabled=false"],
        8,
        "schedule.seq_length",
        "raise model.seq_length",
    ),
    "vocab_positive": (["--model.vocab_size=0"], 8, "model.vocab_size", "tokenizer"),
    "eod_inside_vocab": (["--data.eod_token_id=5000"], 8, "data.eod_token_id", "end-of-document"),
    "fp8_needs_bf16": (["--precision.fp8=e4m3"], 8, "precision.fp8", "precision.dtype=bf16"),
    "fp8_needs_te_layers": (
        ["--precision.fp8=e4m3", "--precision.dtype=bf16", "--model.transformer_impl=local"],
        8,
        "precision.fp8",
        "transformer_impl=auto",
    ),
    "tokenizer_needs_path": (
        ["--tokenizer.tokenizer_type=SentencePieceTokenizer"],
        8,
        "tokenizer.tokenizer_model",
        "tokenizer.tokenizer_model",
    ),
    "adam_beta_range": (["--optimizer.adam_beta2=1.0"], 8, "optimizer.adam_beta2", "0.95"),
    "weight_decay_non_negative": (
        ["--optimizer.weight_decay=-0.1"],
        8,
        "optimizer.weight_decay",
        "0.1",
    ),
    "clip_non_negative": (["--optimizer.clip_grad=-1"], 8, "optimizer.clip_grad", "disable"),
}


@pytest.mark.parametrize("rule", list(RULES))
def test_rule_names_field_and_fix(rule):
    overrides, world_size, field, fix = RULES[rule]
    error = _errors(overrides, world_size)
    matching = [p for p in error.problems if p.field == field]
    assert matching, f"{field} not among {error.fields()}"
    assert any(fix in p.fix for p in matching), [p.fix for p in matching]
    assert field in str(error)


def test_all_problems_reported_at_once():
    error = _errors(["--model.hidden_size=66", "--model.num_layers=5", "--optimizer.clip_grad=-1"])
    assert {"model.hidden_size", "model.num_layers", "optimizer.clip_grad"} <= set(error.fields())


def test_unknown_key_is_an_error_naming_it():
    with pytest.raises(ConfigError) as info:
        load_config(ExperimentConfig, None, ["--model.hiden_size=64"])
    assert info.value.fields() == ["model.hiden_size"]
    assert "hidden_size" in info.value.problems[0].fix


def test_wrong_type_is_an_error():
    with pytest.raises(ConfigError) as info:
        load_config(ExperimentConfig, None, ["--model.num_layers=four"])
    assert info.value.fields() == ["model.num_layers"]


def test_yaml_file_and_overrides_round_trip(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("model:\n  num_layers: 8\nschedule:\n  lr: 3e-4\n")
    cfg = load_config(ExperimentConfig, path, ["--model.hidden_size=128"])
    assert (cfg.model.num_layers, cfg.model.hidden_size, cfg.schedule.lr) == (8, 128, 3e-4)
    assert from_dict(ExperimentConfig, to_dict(cfg)) == cfg


def test_override_needs_equals_sign():
    with pytest.raises(ConfigError):
        apply_overrides({}, ["--model.num_layers"])


def test_unquoted_on_and_off_reach_the_on_off_settings(tmp_path):
    # YAML 1.1 reads on / off as booleans; the fast-path settings take them as written.
    cfg = load_config(
        ExperimentConfig, None, ["--model.compile_layers=on", "--model.fused_cross_entropy=off"]
    )
    assert (cfg.model.compile_layers, cfg.model.fused_cross_entropy) == ("on", "off")
    path = tmp_path / "exp.yaml"
    path.write_text("model:\n  wgrad_fusion: on\n  compile_layers: off\n", encoding="utf-8")
    cfg = load_config(ExperimentConfig, str(path), [])
    assert (cfg.model.wgrad_fusion, cfg.model.compile_layers) == ("on", "off")
    # Elsewhere a boolean is still no string: recompute_granularity has no on / off.
    with pytest.raises(ConfigError, match="model.recompute_granularity"):
        load_config(ExperimentConfig, None, ["--model.recompute_granularity=true"])


def test_mapping_keys_and_values_are_checked_like_fields(tmp_path):
    from megatron_ext.curation.config import CurationConfig

    # YAML reads the unquoted language code `no` (Norwegian) as false: named, not dropped.
    with pytest.raises(ConfigError) as info:
        load_config(CurationConfig, None, ["--langid.min_score_per_language={no: 0.9, en: 0.5}"])
    assert info.value.fields() == ["langid.min_score_per_language.False"]
    assert "quote it" in info.value.problems[0].fix
    with pytest.raises(ConfigError) as info:
        load_config(CurationConfig, None, ["--langid.min_score_per_language={fr: high}"])
    assert info.value.fields() == ["langid.min_score_per_language.fr"]
    cfg = load_config(CurationConfig, None, ["--langid.min_score_per_language={'no': 1}"])
    assert cfg.langid.min_score_per_language == {"no": 1.0}


def test_unreadable_files_and_yaml_errors_are_config_errors(tmp_path):
    """A user's typo in a path, a file or an override is a one-line error, not a traceback."""
    with pytest.raises(ConfigError, match="cannot be read .No such file"):
        load_config(ExperimentConfig, tmp_path / "missing.yaml", [])
    broken = tmp_path / "broken.yaml"
    broken.write_text("model:\n  num_layers: [4\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(ExperimentConfig, broken, [])
    assert info.value.fields() == ["--config"] and f'in "{broken}", line 3' in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_config(ExperimentConfig, None, ["--schedule.train_steps=["])
    assert info.value.fields() == ["schedule.train_steps"]
