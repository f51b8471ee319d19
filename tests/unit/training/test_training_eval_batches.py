"""Validation batches are cut like training batches, so the validation loss measures the same."""

from __future__ import annotations

import numpy as np
import torch

from megatron_ext.data.batches import BatchRequest
from megatron_ext.data.prefetch import make_step_loader
from megatron_ext.data.token_stream import build_token_streams
from megatron_ext.parallel.init import ParallelContext
from megatron_ext.parallel.layout import ParallelLayout
from megatron_ext.training import loop
from megatron_ext.training.experiment import ExperimentConfig
from megatron_ext.training.schedules import TrainProgress
from tests.unit.data.conftest import random_documents, write_indexed_dataset

EOD = 0


def _run(tmp_path, eod_mask_loss: bool, reset_position_ids: bool):
    prefix = write_indexed_dataset(str(tmp_path / "docs"), random_documents(0, 80, 1, 500, 12))
    cfg = ExperimentConfig()
    cfg.data.data_path = [prefix]
    cfg.data.split = "50,50"
    cfg.data.append_eod = True
    cfg.data.eod_token_id = EOD
    cfg.data.eod_mask_loss = eod_mask_loss
    cfg.data.reset_position_ids = reset_position_ids
    cfg.schedule.seq_length, cfg.schedule.global_batch_size = 32, 4
    cfg.schedule.micro_batch_size = 2
    cfg.training.eval_iters = 2
    ctx = ParallelContext(ParallelLayout(world_size=1, tp=1, pp=1), "cpu", 0, 0, 0, 0, 0)
    streams = build_token_streams(cfg.data)
    return cfg, loop._Run(ctx, [], None, None, streams, TrainProgress(), [], None, None)


def _expected(tokens: torch.Tensor, eod_mask_loss: bool, reset_position_ids: bool):
    loss_mask = (tokens != EOD).float() if eod_mask_loss else torch.ones(tokens.shape)
    positions = []
    for row in tokens.tolist():
        position, out = 0, []
        for i in range(len(row)):
            if reset_position_ids and i > 0 and row[i - 1] == EOD:
                position = 0
            out.append(position)
            position += 1
        positions.append(out)
    return loss_mask, torch.tensor(positions)


def test_validation_batches_take_the_datas_loss_mask_and_positions(tmp_path):
    for eod_mask_loss, reset_position_ids in ((True, True), (True, False), (False, False)):
        cfg, run = _run(tmp_path, eod_mask_loss, reset_position_ids)
        batches = loop._eval_batches(cfg, run)
        assert len(batches) == 2
        eods = 0
        for micro_batches in batches:
            for mb in micro_batches:
                eods += int((mb["tokens"] == EOD).sum())
                loss_mask, positions = _expected(mb["tokens"], eod_mask_loss, reset_position_ids)
                assert torch.equal(mb["loss_mask"], loss_mask)
                assert torch.equal(mb["position_ids"], positions)
        assert eods > 4  # documents of at most 12 tokens: the rule is exercised
        # The training loader of the loop cuts its batches by the same rule.
        load = make_step_loader(
            run.streams.valid, dp_rank=0, dp_size=1, micro_batch_size=2, **loop._batch_options(cfg)
        )
        step = load(BatchRequest(step=1, consumed_tokens=0, seq_length=32, global_batch_size=4))
        for from_loader, from_eval in zip(step, batches[0]):
            for key in from_loader:
                assert np.array_equal(from_loader[key], from_eval[key]), key


def test_validation_batches_larger_than_the_split_are_reported(tmp_path, caplog):
    import logging

    cfg, run = _run(tmp_path, eod_mask_loss=False, reset_position_ids=False)
    held = sum(s.num_tokens for s in run.streams.valid.sources)
    per_batch = cfg.schedule.global_batch_size * cfg.schedule.seq_length
    with caplog.at_level(logging.WARNING):
        cfg.training.eval_iters = held // per_batch
        loop._eval_batches(cfg, run)
        assert "validation" not in caplog.text
        cfg.training.eval_iters = held // per_batch + 1
        loop._eval_batches(cfg, run)
    assert f"take {cfg.training.eval_iters * per_batch} tokens but the validation split holds " in (
        caplog.text
    )
