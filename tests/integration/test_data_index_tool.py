"""tools/build_data_index.py: the index built ahead of training is the one training reads."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from megatron_ext.config.loader import load_config
from megatron_ext.data.config import DataConfig
from megatron_ext.data.index_cache import IndexCache
from megatron_ext.data.token_stream import build_token_streams
from megatron_ext.training.experiment import ExperimentConfig
from megatron_ext.training.schedules import planned_tokens
from tests.unit.data.conftest import random_documents, write_indexed_dataset

pytestmark = pytest.mark.timeout(120)

_TOOL = Path(__file__).parents[2] / "tools" / "build_data_index.py"


def _tool():
    spec = importlib.util.spec_from_file_location("build_data_index", _TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _dataset_and_argv(tmp_path: Path, *extra: str) -> tuple[str, list[str]]:
    """A 300-document dataset and the tool's arguments for the tiny CPU config reading it."""
    prefix = write_indexed_dataset(str(tmp_path / "web"), random_documents(4, 300, 3, 900, 40))
    config = str(Path(__file__).parents[2] / "examples/configs/tiny_cpu.yaml")
    return prefix, [
        "--config",
        config,
        f"--data.data_path=[{prefix}]",
        "--data.split=90,10",
        *extra,
    ]


def test_prebuilt_index_leaves_nothing_to_build_for_training(tmp_path, capsys):
    cache_dir = tmp_path / "index"
    prefix, argv = _dataset_and_argv(tmp_path, "--epochs", "2")
    assert _tool().main(argv) == 1
    assert "index_cache_dir is not set" in capsys.readouterr().err
    assert _tool().main([*argv, f"--data.index_cache_dir={cache_dir}"]) == 0
    assert "index entries built" in capsys.readouterr().out

    config = DataConfig(data_path=[prefix], split="90,10", index_cache_dir=str(cache_dir))
    cache = IndexCache(str(cache_dir))
    streams = build_token_streams(config, cache)
    epoch = streams.train.tokens_per_epoch_nominal
    tokens = streams.train.read(epoch // 4, epoch)  # inside epochs 0 and 1
    streams.valid.read(0, 100)
    assert cache.built == []
    reference = build_token_streams(DataConfig(data_path=[prefix], split="90,10"))
    assert np.array_equal(tokens, reference.train.read(epoch // 4, epoch))


def test_default_builds_every_epoch_the_schedule_reads(tmp_path, capsys):
    cache_dir = tmp_path / "index"
    _, argv = _dataset_and_argv(
        tmp_path,
        "--schedule.train_steps=20",
        "--schedule.lr_warmup_steps=2",
        f"--data.index_cache_dir={cache_dir}",
    )
    assert _tool().main(argv) == 0
    config = load_config(ExperimentConfig, argv[1], argv[2:])
    streams = build_token_streams(config.data, IndexCache(str(cache_dir)))
    last = planned_tokens(config.schedule, 1) - 1
    needed = streams.train.epoch_of(last) + 1
    assert needed >= 5, "the run must span several epochs for this test to mean anything"
    assert f"{needed} training epoch(s)" in capsys.readouterr().out

    # Everything the run reads is there: the run's whole span and the evaluation batch.
    cache = IndexCache(str(cache_dir))
    streams = build_token_streams(config.data, cache)
    for start in range(0, last + 1, 4096):
        streams.train.read(start, min(4096, last + 1 - start))
    streams.valid.read(0, 16 * 128 + 1)
    streams.train.wait_for_background()
    streams.valid.wait_for_background()
    # Only the epoch after the last one of each stream (with its dataset order), prepared ahead
    # by the reader, is new.
    valid_needed = streams.valid.epoch_of(16 * 128) + 1
    ahead = {("train", needed), ("valid", valid_needed)}
    for name in cache.built:
        key = json.loads((cache_dir / name / "meta.json").read_text())["key"]
        source = key["sources"][0] if name.startswith("epoch-") else key["source"]
        assert (source["part"], key["epoch"]) in ahead, name


def test_prune_deletes_what_the_run_no_longer_reads(tmp_path, capsys):
    cache_dir = tmp_path / "index"
    prefix, argv = _dataset_and_argv(
        tmp_path, "--epochs", "2", f"--data.index_cache_dir={cache_dir}"
    )
    assert _tool().main(argv) == 0
    first = {p.name for p in cache_dir.iterdir()}
    capsys.readouterr()

    # The training seed changes: the split stays, every shuffled order and epoch is new.
    assert _tool().main([*argv, "--data.seed=7", "--prune"]) == 0
    out = capsys.readouterr().out
    second = {p.name for p in cache_dir.iterdir()}
    kept = first & second
    assert kept and all(name.startswith("split-") for name in kept)
    pruned = first - second
    assert pruned and {name.split("-")[0] for name in pruned} == {"order", "epoch"}
    assert f"pruned {len(pruned)} item(s)" in out

    config = DataConfig(data_path=[prefix], split="90,10", seed=7, index_cache_dir=str(cache_dir))
    cache = IndexCache(str(cache_dir))
    streams = build_token_streams(config, cache)
    streams.train.read(0, streams.train.tokens_per_epoch_nominal)
    streams.valid.read(0, 100)
    assert cache.built == [], "the entries the run reads were kept"
