"""DataConfig: YAML loading and errors that name the field and the fix."""

from __future__ import annotations

import pytest

from megatron_ext.config.errors import ConfigError, ProblemCollector
from megatron_ext.config.loader import load_config
from megatron_ext.data.config import DataConfig, parse_split

pytestmark = pytest.mark.timeout(120)


def _problems(config: DataConfig) -> dict[str, str]:
    problems = ProblemCollector()
    config.validate(problems)
    found: dict[str, str] = {}
    for p in problems.problems:
        found[p.field] = found.get(p.field, "") + f"{p.rule}. Fix: {p.fix}\n"
    return found


def test_valid_config_from_yaml(tmp_path, two_datasets):
    prefix_a, prefix_b, _, _ = two_datasets
    path = tmp_path / "data.yaml"
    path.write_text(
        f"data_path: [{prefix_a}, {prefix_b}]\nblend_weights: [0.3, 0.7]\nsplit: '969,30,1'\n"
    )
    config = load_config(DataConfig, path, ["--num_workers=2"])
    assert config.blend_weights == [0.3, 0.7] and config.num_workers == 2
    assert _problems(config) == {}
    assert parse_split(config.split) == pytest.approx((0.969, 0.03, 0.001))


def test_every_problem_is_reported_with_field_and_fix(tmp_path, two_datasets):
    prefix_a, _, _, _ = two_datasets
    config = DataConfig(
        data_path=[prefix_a, str(tmp_path / "missing")],
        blend_weights=[1.0, 0.0, 2.0],
        split="98",
        eod_mask_loss=True,
        prefetch_batches=0,
    )
    found = _problems(config)
    assert set(found) == {
        "data.data_path[1]",
        "data.blend_weights",
        "data.split",
        "data.eod_token_id",
        "data.prefetch_batches",
    }
    assert "missing.bin" in found["data.data_path[1]"]
    assert "one weight per data_path entry" in found["data.blend_weights"]
    assert "weights must be positive" in found["data.blend_weights"]
    assert "data.eod_mask_loss" in found["data.eod_token_id"]
    assert 'like "98,2"' in found["data.split"]
    assert _problems(DataConfig()).keys() == {"data.data_path"}


def test_unknown_key_is_rejected(tmp_path):
    path = tmp_path / "data.yaml"
    path.write_text("data_paths: [x]\n")
    with pytest.raises(ConfigError, match="data_paths"):
        load_config(DataConfig, path)
