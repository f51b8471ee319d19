"""Hugging Face weight files: sharded safetensors writing, and reading safetensors or ``.bin``.

``ShardedSafetensorsWriter`` is given every tensor name and shape up front, assigns them to
shards of at most ``max_shard_size`` bytes, and writes a shard as soon as its last tensor
arrives, so at most one shard is held in memory. Files are named
``model-00001-of-0000N.safetensors`` with ``model.safetensors.index.json`` (as ``transformers``'
``save_pretrained`` does).

``HFWeights`` opens a model directory (``model.safetensors``, a safetensors index,
``pytorch_model.bin`` or a ``.bin`` index) and loads tensors by name.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})


def parse_size(value: str | int) -> int:
    """Bytes of ``"5GB"``, ``"500MiB"``, ``"1000"`` or an int (decimal units as in transformers)."""
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE.match(value)
        unit = match.group(2).upper() if match else ""
        if not match or unit not in _UNITS:
            raise ValueError(f"cannot read size {value!r}; write e.g. 5GB, 500MB or 2GiB")
        size = int(float(match.group(1)) * _UNITS[unit])
    if size <= 0:
        raise ValueError(f"size must be positive, got {value!r}")
    return size


class ShardedSafetensorsWriter:
    """Writes planned tensors into safetensors shards, one shard in memory at a time."""

    def __init__(
        self,
        output_dir: Path,
        shapes: list[tuple[str, tuple[int, ...]]],
        dtype: torch.dtype,
        max_shard_size: int,
    ):
        self.output_dir = output_dir
        self.dtype = dtype
        self._shapes = dict(shapes)
        itemsize = torch.empty((), dtype=dtype).element_size()
        shards: list[list[str]] = [[]]
        current = 0
        for name, shape in shapes:
            nbytes = itemsize * _numel(shape)
            if shards[-1] and current + nbytes > max_shard_size:
                shards.append([])
                current = 0
            shards[-1].append(name)
            current += nbytes
        self._shards = shards
        self._shard_of = {name: i for i, names in enumerate(shards) for name in names}
        self._pending: dict[str, torch.Tensor] = {}
        self._next = 0
        self._total = itemsize * sum(_numel(shape) for _, shape in shapes)

    def shard_file(self, index: int) -> str:
        return f"model-{index + 1:05d}-of-{len(self._shards):05d}.safetensors"

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self._shapes:
            raise AssertionError(f"unplanned tensor {name}")
        if tuple(tensor.shape) != tuple(self._shapes[name]):
            raise ValueError(
                f"{name}: shape {tuple(tensor.shape)}, expected {tuple(self._shapes[name])}"
            )
        self._pending[name] = tensor.to(self.dtype).contiguous()
        while self._next < len(self._shards) and all(
            n in self._pending for n in self._shards[self._next]
        ):
            self._flush(self._next)
            self._next += 1

    def finish(self) -> list[str]:
        """Write the index; every planned tensor must have been added."""
        missing = [n for names in self._shards[self._next :] for n in names]
        if missing:
            raise AssertionError(f"tensors never added: {missing[:5]}")
        index = {
            "metadata": {"total_size": self._total},
            "weight_map": {name: self.shard_file(i) for name, i in self._shard_of.items()},
        }
        (self.output_dir / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return [self.shard_file(i) for i in range(len(self._shards))]

    def _flush(self, index: int) -> None:
        from safetensors.torch import save_file

        tensors = {name: self._pending.pop(name) for name in self._shards[index]}
        save_file(tensors, str(self.output_dir / self.shard_file(index)), metadata={"format": "pt"})


class HFWeights:
    """Tensors of a Hugging Face model directory, loaded by name."""

    def __init__(self, model_dir: str | os.PathLike):
        self.path = Path(model_dir)
        self._file_of: dict[str, Path] = {}
        self._bin_cache: tuple[Path, dict[str, torch.Tensor]] | None = None
        if (self.path / "model.safetensors").is_file():
            self._index_single(self.path / "model.safetensors")
        elif (self.path / SAFE_INDEX).is_file():
            self._index_map(self.path / SAFE_INDEX)
        elif (self.path / "pytorch_model.bin").is_file():
            self._file_of = {
                name: self.path / "pytorch_model.bin"
                for name in self._load_bin(self.path / "pytorch_model.bin")
            }
        elif (self.path / BIN_INDEX).is_file():
            self._index_map(self.path / BIN_INDEX)
        else:
            raise ValueError(
                f"{self.path} has no model.safetensors, {SAFE_INDEX}, pytorch_model.bin or "
                f"{BIN_INDEX}"
            )

    def names(self) -> list[str]:
        return list(self._file_of)

    def get(self, name: str) -> torch.Tensor:
        if name not in self._file_of:
            raise ValueError(f"{self.path} holds no tensor {name!r}")
        file = self._file_of[name]
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(file), framework="pt") as handle:
                return handle.get_tensor(name)
        return self._load_bin(file)[name]

    def _index_single(self, file: Path) -> None:
        from safetensors import safe_open

        with safe_open(str(file), framework="pt") as handle:
            self._file_of = {name: file for name in handle.keys()}

    def _index_map(self, index_file: Path) -> None:
        try:
            weight_map = json.loads(index_file.read_text(encoding="utf-8"))["weight_map"]
        except (ValueError, KeyError) as exc:
            raise ValueError(f"{index_file} is not a weight index: {exc}") from exc
        self._file_of = {name: self.path / file for name, file in weight_map.items()}
        for file in set(self._file_of.values()):
            if not file.is_file():
                raise ValueError(f"{index_file} names {file.name}, which is missing")

    def _load_bin(self, file: Path) -> dict[str, torch.Tensor]:
        # One .bin shard is kept loaded: names are read in file order, so each loads once.
        if self._bin_cache is None or self._bin_cache[0] != file:
            try:
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:
                # Files in torch's legacy (pre-zip) format cannot be memory-mapped.
                state = torch.load(file, map_location="cpu", weights_only=True)
            self._bin_cache = (file, state)
        return self._bin_cache[1]


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count
