"""Checkpoint directories with real torch_dist files, written without a process group."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml


def write_checkpoint(save_dir: Path, step: int, *, latest: bool = True) -> Path:
    """A complete checkpoint as a save writes it: DCP tensors, common.pt and our own files."""
    import torch.distributed.checkpoint as dcp

    from megatron_ext.checkpoint import directory as fs

    path = save_dir / fs.checkpoint_name(step)
    path.mkdir(parents=True)
    tensors = {"weight": torch.full((64, 32), float(step)), "bias": torch.arange(16.0)}
    dcp.save(tensors, checkpoint_id=str(path), no_dist=True)
    torch.save({"opt_param_scheduler": {"num_steps": step}}, path / "common.pt")
    (path / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist"}))
    (path / fs.RUN_STATE_FILE).write_text(json.dumps({"step": step, "consumed_tokens": step * 8}))
    (path / fs.CONFIG_FILE).write_text(yaml.safe_dump({"seed": 1, "model": {"hidden_size": 64}}))
    (path / fs.VERSIONS_FILE).write_text(json.dumps({"torch": torch.__version__}))
    files = sorted(p.name for p in path.iterdir()) + [fs.CHECKPOINT_FILE]
    meta = {
        "format_version": 1,
        "step": step,
        "layout": {"world_size": 1, "tp": 1, "pp": 1, "cp": 1, "vpp": None},
        "files": sorted(files),
    }
    (path / fs.CHECKPOINT_FILE).write_text(json.dumps(meta))
    if latest:
        fs.write_latest(save_dir, path.name)
    return path


@pytest.fixture
def make_checkpoint():
    return write_checkpoint
