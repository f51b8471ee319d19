"""Read tensors of a megatron-core ``torch_dist`` checkpoint one at a time, without a process group.

A ``torch_dist`` checkpoint stores every tensor at its full (unsharded) shape, whatever TP/PP/VPP
layout wrote it, so a single process reads it with ``torch.distributed.checkpoint`` directly. The
reader asks for a region of one key (e.g. one layer of the stacked ``[L, ...]`` decoder weights, or
the unpadded rows of the embedding) and gets that region in a preallocated tensor.
``torch.distributed.checkpoint`` reads each stored chunk whole and copies the region out, so memory
stays bounded by a few times the largest stored chunk read, never by the checkpoint.

    reader = DistCheckpointReader("runs/demo/checkpoints/iter_0000100")
    reader.shape("decoder.layers.self_attention.linear_qkv.weight")   # (L, (nq + 2 ng) hd, H)
    qkv_0 = reader.read("decoder.layers.self_attention.linear_qkv.weight", index=0)

It also resolves what users pass as ``--checkpoint``: a run directory (its ``latest`` checkpoint,
or ``iteration=N``), a run's ``checkpoints/`` directory, or one ``iter_NNNNNNN`` directory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import load as dcp_load
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    MetadataIndex,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadPlan
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"


def iteration_dir_name(step: int) -> str:
    """``iter_0000100`` for step 100 (the directory name of a checkpoint)."""
    return f"iter_{step:07d}"


def resolve_checkpoint_dir(path: str | os.PathLike, iteration: int | None = None) -> Path:
    """The ``iter_NNNNNNN`` directory meant by ``path`` (run dir, ``checkpoints/`` or a checkpoint).

    A run directory or its ``checkpoints/`` directory resolves to ``iteration`` when given, else to
    the directory named in ``checkpoints/latest``. Raises ValueError naming what is missing.
    """
    path = Path(path)
    if not path.exists():
        raise ValueError(f"checkpoint path {path} does not exist")
    if (path / "metadata.json").is_file():
        if iteration is not None and path.name != iteration_dir_name(iteration):
            raise ValueError(
                f"{path} is one checkpoint ({path.name}); --iteration {iteration} needs a run "
                "directory or its checkpoints/ directory"
            )
        return path
    root = path / CHECKPOINTS_DIR if (path / CHECKPOINTS_DIR).is_dir() else path
    if iteration is not None:
        candidate = root / iteration_dir_name(iteration)
        if not (candidate / "metadata.json").is_file():
            available = sorted(p.name for p in root.glob("iter_*") if p.is_dir())
            raise ValueError(f"no checkpoint {candidate}; available: {available or 'none'}")
        return candidate
    latest = root / LATEST_FILE
    if not latest.is_file():
        raise ValueError(
            f"{path} is neither a checkpoint directory (no metadata.json) nor a run directory "
            f"with {CHECKPOINTS_DIR}/{LATEST_FILE}; pass an iter_NNNNNNN directory or --iteration"
        )
    name = latest.read_text(encoding="utf-8").strip()
    candidate = Path(name) if os.path.isabs(name) else root / name
    if not (candidate / "metadata.json").is_file():
        raise ValueError(f"{latest} names {name!r}, but {candidate} holds no complete checkpoint")
    return candidate


class _RegionLoadPlanner(DefaultLoadPlanner):
    """Plans reads of one region of one stored tensor into a tensor of exactly that region."""

    def __init__(self, key: str, offsets: list[int], sizes: list[int]):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._key = key
        self._chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes))

    def create_local_plan(self) -> LoadPlan:
        assert self.metadata is not None
        stored = self.metadata.state_dict_metadata[self._key]
        return LoadPlan(create_read_items_for_chunk_list(self._key, stored, [self._chunk]))

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        # The destination is a plain tensor of exactly the region; read offsets are relative to it.
        return self.state_dict[index.fqn]


class DistCheckpointReader:
    """Random access to the tensors of one ``torch_dist`` checkpoint directory."""

    def __init__(self, checkpoint_dir: str | os.PathLike):
        self.path = Path(checkpoint_dir)
        meta_file = self.path / "metadata.json"
        if not meta_file.is_file():
            raise ValueError(
                f"{self.path} is not a dist_checkpointing checkpoint (no metadata.json)"
            )
        try:
            backend = json.loads(meta_file.read_text(encoding="utf-8")).get("sharded_backend")
        except ValueError as exc:
            raise ValueError(f"{meta_file} is not valid JSON: {exc}") from exc
        if backend != "torch_dist":
            raise ValueError(
                f"{self.path} was written with sharded_backend={backend!r}; only torch_dist is read"
            )
        self._storage = FileSystemReader(str(self.path))
        try:
            self._metadata = self._storage.read_metadata()
        except (OSError, EOFError, RuntimeError, ValueError) as exc:
            raise ValueError(f"cannot read the torch_dist metadata of {self.path}: {exc}") from exc
        self._tensors: dict[str, TensorStorageMetadata] = {
            key: md
            for key, md in self._metadata.state_dict_metadata.items()
            if isinstance(md, TensorStorageMetadata)
        }

    def keys(self) -> list[str]:
        """Names of the stored tensors (byte entries such as ``_extra_state`` are left out)."""
        return sorted(self._tensors)

    def has(self, key: str) -> bool:
        return key in self._tensors

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._metadata_of(key).size)

    def dtype(self, key: str) -> torch.dtype:
        return self._metadata_of(key).properties.dtype

    def read(self, key: str, index: int | None = None, rows: int | None = None) -> torch.Tensor:
        """The stored tensor ``key``, or its slice ``[index]`` along dim 0, or its first ``rows``.

        ``index`` picks one layer of a stacked ``[L, ...]`` tensor (the result drops that axis);
        ``rows`` keeps the first rows of dim 0 (the unpadded vocabulary of an embedding).
        """
        size = list(self.shape(key))
        offsets = [0] * len(size)
        if index is not None:
            if not 0 <= index < size[0]:
                raise ValueError(f"{key}: index {index} outside its first dimension {size[0]}")
            offsets[0], size[0] = index, 1
        elif rows is not None:
            if not 0 < rows <= size[0]:
                raise ValueError(f"{key}: cannot read {rows} rows of a tensor with {size[0]}")
            size[0] = rows
        out = torch.empty(size, dtype=self.dtype(key))
        planner = _RegionLoadPlanner(key, offsets, size)
        try:
            dcp_load({key: out}, storage_reader=self._storage, planner=planner, no_dist=True)
        except (CheckpointException, OSError, RuntimeError, ValueError) as exc:
            raise ValueError(f"cannot read {key} from {self.path}: {exc}") from exc
        return out[0] if index is not None else out

    def _metadata_of(self, key: str) -> TensorStorageMetadata:
        if key not in self._tensors:
            raise ValueError(f"{self.path} holds no tensor {key!r}")
        return self._tensors[key]
