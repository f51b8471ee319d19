"""Background checkpoint saves (``checkpoint.async_save``) on 4 processes, TP2 x DP2, over gloo.

One run of 4 ranks: train steps 1-2; save step 2 synchronously into ``sync/`` and in the background
into ``async/``; train steps 3-4 while the background writers may still run (step 3 changes every
weight in place); publish. Then one rank's writer fails (an injected ENOSPC in rank 1's file
writes): every rank gets the error, nothing is published, ``latest`` stays put, and the next
background save succeeds and clears the failed attempt's directory; the same for a synchronous
save.

The checks: the background checkpoint of step 2 holds exactly the tensors of the synchronous one
(the snapshot is taken when the save is called, not when the files are written); both verify and
carry the same run state; training is not changed by saving in the background.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch

from megatron_ext.parallel.local_launch import run_on_local_processes
from tests.distributed.test_checkpoint_reshard import _full_tensors, _Trainer


def _save(trainer: _Trainer, cfg, background):
    from megatron_ext.checkpoint.manager import save_checkpoint

    return save_checkpoint(
        cfg,
        Path(cfg.save_dir).parent,
        trainer.step,
        trainer.model,
        trainer.optimizer,
        trainer.scheduler,
        {"consumed_tokens": trainer.consumed_tokens},
        trainer.config,
        trainer.ctx,
        background,
    )


def _failing_write(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device (injected)")


def worker(rank: int, root: str) -> dict:
    import logging

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from megatron_ext.checkpoint import directory as fs
    from megatron_ext.checkpoint.background import BackgroundSaves
    from megatron_ext.checkpoint.config import CheckpointConfig
    from megatron_ext.checkpoint.directory import CheckpointError
    from megatron_ext.parallel.init import destroy_parallel

    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    root_dir = Path(root)
    # The synchronous save gathers the optimizer state onto DP rank 0 over gloo, the background
    # save onto every rank (the default): both must store the same tensors.
    sync_cfg = CheckpointConfig(save_dir=str(root_dir / "sync"), optimizer_gather_on_cpu=True)
    async_cfg = CheckpointConfig(save_dir=str(root_dir / "async"), async_save=True)
    trainer = _Trainer(tp=2, pp=1, seed=1234)
    background = BackgroundSaves()
    results: dict = {}
    try:
        trainer.train(results)
        trainer.train(results)
        _save(trainer, sync_cfg, None)
        _save(trainer, async_cfg, background)
        results["in_flight_after_save"] = background.in_flight
        trainer.train(results)
        published = background.finalize_finished()
        trainer.train(results)
        published += background.wait()
        results["published"] = published
        results["latest_after_step_2"] = fs.read_latest(Path(async_cfg.save_dir))

        # One rank's writer fails: every rank learns it; nothing is published. The same for a
        # synchronous save, whose failure megatron-core raises as torch's CheckpointException, a
        # BaseException that save_checkpoint turns into a CheckpointError.
        original_write = filesystem_async._write_item
        if rank == 1:
            filesystem_async._write_item = _failing_write
        try:
            for name, cfg, saves in (("", async_cfg, background), ("sync_", sync_cfg, None)):
                try:
                    _save(trainer, cfg, saves)
                    background.wait()
                    results[f"{name}failure"] = None
                except CheckpointError as exc:
                    results[f"{name}failure"] = str(exc)
        finally:
            filesystem_async._write_item = original_write
        results["in_flight_after_failure"] = background.in_flight
        results["latest_after_failure"] = fs.read_latest(Path(async_cfg.save_dir))
        results["sync_latest_after_failure"] = fs.read_latest(Path(sync_cfg.save_dir))

        trainer.train(results)
        _save(trainer, async_cfg, background)
        results["published_after_failure"] = background.wait()
        results["entries"] = sorted(os.listdir(async_cfg.save_dir))
        _save(trainer, sync_cfg, None)
        results["sync_entries"] = sorted(os.listdir(sync_cfg.save_dir))
    finally:
        background.abort()
        destroy_parallel()
    return results


@pytest.fixture(scope="module")
def async_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("async_save")
    results = run_on_local_processes(worker, 4, str(root))
    return root, results


@pytest.mark.timeout(600)
def test_async_save_equals_synchronous_save(async_run, tmp_path):
    root, results = async_run
    for rank_results in results:
        assert rank_results["in_flight_after_save"] == 1
        assert rank_results["published"] == [2]
        assert rank_results["latest_after_step_2"] == "iter_0000002"
    sync_dir = root / "sync" / "iter_0000002"
    async_dir = root / "async" / "iter_0000002"
    from megatron_ext.checkpoint import directory as fs

    assert fs.verify_checkpoint(sync_dir) == []
    assert fs.verify_checkpoint(async_dir) == []
    synchronous = _full_tensors(sync_dir, tmp_path)
    background = _full_tensors(async_dir, tmp_path)
    assert synchronous.keys() == background.keys()
    assert any(k.startswith("optimizer.state.exp_avg_sq.") for k in synchronous)
    for key in synchronous:
        assert torch.equal(synchronous[key], background[key]), key
    sync_state = json.loads((sync_dir / fs.RUN_STATE_FILE).read_text())
    async_state = json.loads((async_dir / fs.RUN_STATE_FILE).read_text())
    assert sync_state == async_state == {"step": 2, "consumed_tokens": 2 * 8 * 32}
    # Every rank trained the same steps with the same losses whatever was being written.
    assert len({r["loss_3"] for r in results}) == 1
    assert len({r["loss_5"] for r in results}) == 1


@pytest.mark.timeout(600)
def test_async_save_failure_on_one_rank_reaches_every_rank(async_run):
    root, results = async_run
    for rank_results in results:
        assert rank_results["failure"] is not None
        assert "step 4" in rank_results["failure"]
        assert rank_results["in_flight_after_failure"] == 0
        assert rank_results["latest_after_failure"] == "iter_0000002"
        assert rank_results["published_after_failure"] == [5]
    # The failed attempt left no directory behind once the next save started.
    assert results[0]["entries"] == ["iter_0000002", "iter_0000005", "latest"]


@pytest.mark.timeout(600)
def test_synchronous_save_failure_on_one_rank_reaches_every_rank(async_run):
    root, results = async_run
    for rank, rank_results in enumerate(results):
        failure = rank_results["sync_failure"]
        assert failure is not None and "save of step 4" in failure, failure
        # Rank 0 names the failing rank and its error; the others point to rank 0.
        if rank == 0:
            assert "No space left on device (injected)" in failure
        else:
            assert "another rank" in failure
        assert rank_results["sync_latest_after_failure"] == "iter_0000002"
    assert results[0]["sync_entries"] == ["iter_0000002", "iter_0000005", "latest"]
