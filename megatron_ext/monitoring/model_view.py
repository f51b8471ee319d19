"""Where this rank's transformer layers, parameters and reduced gradients are, for exact statistics.

Every statistic here is a sum (or max) over the global model, computed as one all-reduce over all
ranks. That is exact only when each element of each parameter (and gradient) is counted by exactly
one rank, so this module decides, per parameter, which element range this rank counts:

- tensor parallel: sharded weights (``param.tensor_model_parallel``) are counted by every TP rank
  (each holds a different shard); replicated ones (norms) only by TP rank 0;
- pipeline parallel: each stage holds its own layers (``layer.layer_number`` is global, 1-based);
- data parallel: with megatron-core's distributed optimizer the reduced gradient is valid only in
  this rank's shard of each bucket after the reduce-scatter, so each DP rank counts its shard of the
  grad buffer (and of the parameters, which are sharded the same way); without it, gradients are
  all-reduced and DP rank 0 counts everything;
- parameters marked ``shared`` (a tied output layer on the last stage) are not counted twice.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class OwnedPart:
    """The element range ``[start, end)`` of a flattened parameter this rank counts."""

    name: str
    layer: int | None
    """Global 0-based transformer layer index, or None for embedding / final norm / output."""
    param: torch.nn.Parameter
    start: int
    end: int

    def values(self) -> torch.Tensor:
        return self.param.detach().view(-1)[self.start : self.end]

    def grad(self) -> torch.Tensor | None:
        """The reduced gradient (``main_grad`` of megatron DDP, else ``.grad``) of the range."""
        grad = getattr(self.param, "main_grad", None)
        if grad is None:
            grad = self.param.grad
        return None if grad is None else grad.detach().view(-1)[self.start : self.end]


def unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """The ``GPTModel`` inside DDP / Float16Module wrappers."""
    module = chunk
    while not hasattr(module, "decoder") and hasattr(module, "module"):
        module = module.module
    if not hasattr(module, "decoder"):
        raise ValueError(f"{type(chunk).__name__} holds no GPTModel (no .decoder attribute)")
    return module


def transformer_layers(chunks: list[torch.nn.Module]) -> list[tuple[int, torch.nn.Module]]:
    """(global 0-based layer index, TransformerLayer) for every layer held by this rank."""
    layers = []
    for chunk in chunks:
        for layer in unwrap(chunk).decoder.layers:
            layers.append((int(layer.layer_number) - 1, layer))
    return layers


def owned_parts(
    chunks: list[torch.nn.Module], tp_rank: int, fallback_dp_rank: int
) -> list[OwnedPart]:
    """Every parameter range this rank counts (see the module docstring).

    ``fallback_dp_rank`` decides replica ownership for chunks not wrapped in megatron DDP.
    """
    parts = []
    for chunk in chunks:
        model = unwrap(chunk)
        layer_of = {}
        for index, layer in transformer_layers([model]):
            for param in layer.parameters():
                layer_of[id(param)] = index
        ranges, counts_replicas = _dp_ranges(chunk, fallback_dp_rank)
        for name, param in model.named_parameters():
            if getattr(param, "shared", False):
                continue
            if not getattr(param, "tensor_model_parallel", False) and tp_rank != 0:
                continue
            whole = (0, param.numel()) if counts_replicas else (0, 0)
            start, end = ranges.get(id(param), whole)
            if end > start:
                parts.append(OwnedPart(name, layer_of.get(id(param)), param, start, end))
    return parts


def _dp_ranges(
    chunk: torch.nn.Module, fallback_dp_rank: int
) -> tuple[dict[int, tuple[int, int]], bool]:
    """(id(param) -> owned element range, whether this rank counts data-parallel replicas)."""
    buffers = getattr(chunk, "buffers", None)
    if (
        not isinstance(buffers, list) or not buffers
    ):  # not megatron DDP (Module.buffers is a method)
        return {}, fallback_dp_rank == 0
    buffers = buffers + list(getattr(chunk, "expert_parallel_buffers", None) or [])
    distributed = chunk.ddp_config.use_distributed_optimizer
    ranges: dict[int, tuple[int, int]] = {}
    for buffer in buffers:
        group = buffer.data_parallel_group
        rank, size = group.rank(), group.size()
        for param, (start, end, bucket_id) in buffer.param_index_map.items():
            if not distributed:
                ranges[id(param)] = (0, param.numel()) if rank == 0 else (0, 0)
                continue
            bucket = buffer.buckets[bucket_id]
            shard = bucket.grad_data.numel() // size
            lo = max(start, bucket.offset + rank * shard)
            hi = min(end, bucket.offset + (rank + 1) * shard)
            ranges[id(param)] = (lo - start, hi - start) if hi > lo else (0, 0)
    return ranges, buffers[0].data_parallel_group.rank() == 0
