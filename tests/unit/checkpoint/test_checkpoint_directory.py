"""Atomic publication, verification, the ``latest`` pointer, retention and the choice of resume."""

from __future__ import annotations

import json
import logging

import pytest

from megatron_ext.checkpoint import directory as fs
from megatron_ext.checkpoint.config import CheckpointConfig
from megatron_ext.checkpoint.directory import CheckpointError
from megatron_ext.checkpoint.manager import _locate


def test_complete_checkpoint_verifies(tmp_path, make_checkpoint):
    path = make_checkpoint(tmp_path, 10)
    assert fs.verify_checkpoint(path) == []
    assert fs.read_latest(tmp_path) == "iter_0000010"
    assert fs.list_checkpoints(tmp_path) == [(10, path)]


def test_missing_storage_file_is_named(tmp_path, make_checkpoint):
    path = make_checkpoint(tmp_path, 10)
    data_file = next(path.glob("*.distcp"))
    data_file.unlink()
    problems = fs.verify_checkpoint(path)
    assert any(str(data_file) in p and "missing" in p for p in problems), problems


def test_truncated_storage_file_is_named(tmp_path, make_checkpoint):
    path = make_checkpoint(tmp_path, 10)
    data_file = next(path.glob("*.distcp"))
    data_file.write_bytes(data_file.read_bytes()[:100])
    problems = fs.verify_checkpoint(path)
    assert any(str(data_file) in p and "truncated" in p for p in problems), problems


@pytest.mark.parametrize("name", ["run_state.json", "metadata.json", "checkpoint.json"])
def test_corrupt_json_is_named(tmp_path, make_checkpoint, name):
    path = make_checkpoint(tmp_path, 10)
    (path / name).write_text('{"step": 1')
    problems = fs.verify_checkpoint(path)
    assert any(str(path / name) in p for p in problems), problems


def test_corrupt_tensor_index_and_common_file(tmp_path, make_checkpoint):
    path = make_checkpoint(tmp_path, 10)
    (path / ".metadata").write_bytes(b"not a pickle")
    (path / "common.pt").write_bytes(b"garbage")
    problems = fs.verify_checkpoint(path)
    assert any(".metadata" in p for p in problems), problems
    assert any("common.pt" in p for p in problems), problems


def test_file_listed_by_the_save_must_exist(tmp_path, make_checkpoint):
    path = make_checkpoint(tmp_path, 10)
    (path / "versions.json").unlink()
    assert any("versions.json" in p for p in fs.verify_checkpoint(path))


def test_latest_is_replaced_atomically(tmp_path):
    fs.write_latest(tmp_path, "iter_0000010")
    fs.write_latest(tmp_path, "iter_0000020")
    assert (tmp_path / "latest").read_text() == "iter_0000020\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest"]


def test_garbage_in_latest_is_an_error(tmp_path):
    (tmp_path / "latest").write_text("../../etc\n")
    with pytest.raises(CheckpointError, match="not a checkpoint name"):
        fs.read_latest(tmp_path)


def test_retention_keeps_newest_and_latest(tmp_path, make_checkpoint):
    for step in (10, 20, 30, 40):
        make_checkpoint(tmp_path, step, latest=False)
    fs.write_latest(tmp_path, "iter_0000020")
    removed = fs.apply_retention(tmp_path, keep_last=1)
    assert sorted(p.name for p in removed) == ["iter_0000010", "iter_0000030"]
    assert [p.name for _, p in fs.list_checkpoints(tmp_path)] == ["iter_0000020", "iter_0000040"]
    assert fs.stale_temp_dirs(tmp_path) == []


def test_retention_never_deletes_the_only_checkpoint(tmp_path, make_checkpoint):
    make_checkpoint(tmp_path, 10, latest=False)
    assert fs.apply_retention(tmp_path, keep_last=1) == []
    fs.write_latest(tmp_path, "iter_0000010")
    assert fs.apply_retention(tmp_path, keep_last=1) == []
    assert fs.apply_retention(tmp_path, keep_last=None) == []
    assert len(fs.list_checkpoints(tmp_path)) == 1


def test_stale_temp_dirs_are_removed_and_reported(tmp_path, make_checkpoint, caplog):
    make_checkpoint(tmp_path, 10)
    stale = fs.new_temp_dir(tmp_path, 20)
    stale.mkdir()
    (stale / "__0_0.distcp").write_bytes(b"partial")
    deleting = tmp_path / "iter_0000005.deleting-abc123"
    deleting.mkdir()
    with caplog.at_level(logging.WARNING):
        removed = fs.remove_stale_temp_dirs(tmp_path)
    assert sorted(removed) == sorted([stale, deleting])
    assert not stale.exists() and not deleting.exists()
    assert str(stale) in caplog.text
    assert fs.list_checkpoints(tmp_path)[0][0] == 10


def test_publish_replaces_a_same_step_checkpoint_latest_never_named(tmp_path, make_checkpoint):
    make_checkpoint(tmp_path, 10)
    orphan = make_checkpoint(tmp_path, 20, latest=False)
    (orphan / "marker").write_text("old")
    temp = fs.new_temp_dir(tmp_path, 20)
    temp.mkdir()
    (temp / "marker").write_text("new")
    fs.publish(temp, tmp_path / "iter_0000020")
    assert (tmp_path / "iter_0000020" / "marker").read_text() == "new"
    assert not temp.exists()


# ---- which checkpoint a resume picks ---------------------------------------------------------
def test_nothing_to_resume(tmp_path):
    assert _locate(CheckpointConfig(), tmp_path) is None


def test_resume_picks_latest_not_newest(tmp_path, make_checkpoint, caplog):
    save_dir = tmp_path / "checkpoints"
    make_checkpoint(save_dir, 10)
    # A crash after the rename of step 20 but before `latest` moved: 10 is still the resume.
    make_checkpoint(save_dir, 20, latest=False)
    with caplog.at_level(logging.WARNING):
        found = _locate(CheckpointConfig(), tmp_path)
    assert found["path"] == str(save_dir / "iter_0000010")
    assert found["run_state"] == {"step": 10, "consumed_tokens": 80}
    assert found["meta"]["step"] == 10
    assert "iter_0000020" in caplog.text


def test_no_latest_starts_fresh_and_says_so(tmp_path, make_checkpoint, caplog):
    make_checkpoint(tmp_path / "checkpoints", 10, latest=False)
    with caplog.at_level(logging.WARNING):
        assert _locate(CheckpointConfig(), tmp_path) is None
    assert "no `latest`" in caplog.text


def test_corrupt_latest_names_file_and_last_good(tmp_path, make_checkpoint):
    save_dir = tmp_path / "checkpoints"
    good = make_checkpoint(save_dir, 10)
    bad = make_checkpoint(save_dir, 20)
    broken = next(bad.glob("*.distcp"))
    broken.unlink()
    with pytest.raises(CheckpointError) as info:
        _locate(CheckpointConfig(), tmp_path)
    message = str(info.value)
    assert str(broken) in message
    assert f"--checkpoint.load={good}" in message
    # Never a silent fallback: the explicit path then works.
    assert _locate(CheckpointConfig(load=str(good)), tmp_path)["meta"]["step"] == 10


def test_latest_naming_a_missing_directory(tmp_path, make_checkpoint):
    save_dir = tmp_path / "checkpoints"
    make_checkpoint(save_dir, 10)
    fs.write_latest(save_dir, "iter_0000030")
    with pytest.raises(CheckpointError, match="iter_0000030.*does not exist.*iter_0000010"):
        _locate(CheckpointConfig(), tmp_path)


def test_explicit_load_of_save_dir_or_checkpoint(tmp_path, make_checkpoint):
    other = tmp_path / "other_run"
    make_checkpoint(other, 10)
    make_checkpoint(other, 20)
    assert _locate(CheckpointConfig(load=str(other)), tmp_path)["meta"]["step"] == 20
    chosen = _locate(CheckpointConfig(load=str(other / "iter_0000010")), tmp_path)
    assert chosen["meta"]["step"] == 10


def test_a_run_started_from_load_resumes_from_its_own_checkpoints(
    tmp_path, make_checkpoint, caplog
):
    """A requeued job runs the same command: checkpoint.load (and finetune) named where it
    started, and it must go on from its own newer checkpoints, not start again."""
    base = make_checkpoint(tmp_path / "base_model", 500)
    for finetune in (False, True):
        cfg = CheckpointConfig(load=str(base), finetune=finetune)
        first = _locate(cfg, tmp_path / f"run_{finetune}")
        assert first["path"] == str(base) and first["finetune"] is finetune
        save_dir = tmp_path / f"run_{finetune}" / "checkpoints"
        make_checkpoint(save_dir, 4)
        make_checkpoint(save_dir, 8)
        with caplog.at_level(logging.WARNING):
            again = _locate(cfg, tmp_path / f"run_{finetune}")
        assert again["path"] == str(save_dir / "iter_0000008") and again["finetune"] is False
        assert "has checkpoints of its own now, and resumes from" in caplog.text
        # Going back to one of the run's own checkpoints is taken as given.
        back = _locate(CheckpointConfig(load=str(save_dir / "iter_0000004")), save_dir.parent)
        assert back["path"] == str(save_dir / "iter_0000004")


def test_explicit_load_must_exist(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        _locate(CheckpointConfig(load=str(tmp_path / "nope")), tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="neither a checkpoint"):
        _locate(CheckpointConfig(load=str(tmp_path / "empty")), tmp_path)


def test_unknown_format_version_is_refused(tmp_path, make_checkpoint):
    path = make_checkpoint(tmp_path / "checkpoints", 10)
    meta = json.loads((path / "checkpoint.json").read_text())
    meta["format_version"] = 99
    (path / "checkpoint.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="format_version 99"):
        _locate(CheckpointConfig(), tmp_path)


def test_a_save_that_cannot_fit_is_refused_before_writing(tmp_path, make_checkpoint):
    save_dir = tmp_path / "ckpt"
    fs.check_free_space(save_dir, 1, free_bytes=0)  # nothing saved yet: nothing to compare with
    newest = make_checkpoint(save_dir, 10)
    size = fs.directory_bytes(newest)
    assert size > 0
    fs.check_free_space(save_dir, 20, free_bytes=int(size * 1.06))
    with pytest.raises(CheckpointError, match="not enough free space") as info:
        fs.check_free_space(save_dir, 20, free_bytes=size)
    assert "step 20" in str(info.value) and "checkpoint.keep_last" in str(info.value)
    # What the filesystem reports: this machine has room for a checkpoint of a few kB.
    fs.check_free_space(save_dir, 20)
