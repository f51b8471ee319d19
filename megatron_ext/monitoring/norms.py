"""Global parameter norm and update-to-weight ratio over the model parameters of all ranks.

Both are sums of squares over the element ranges of ``model_view.owned_parts`` (each element of
the global model counted once over TP, PP and DP, also with the distributed optimizer), reduced
with one all-reduce. The update-to-weight ratio is ``||W_after - W_before|| / ||W_before||`` over
the whole model; the snapshot of ``W_before`` copies only this rank's owned ranges (with the
distributed optimizer: its 1/DP share of the local parameters).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_ext.monitoring.model_view import OwnedPart


def _all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def param_norm(parts: list[OwnedPart], device: torch.device) -> float:
    """L2 norm of all model parameters (identical on every rank; a collective call)."""
    total = torch.zeros(1, dtype=torch.float64, device=device)
    for part in parts:
        total += torch.linalg.vector_norm(part.values(), dtype=torch.float64).square()
    return float(_all_reduce_sum(total).sqrt().item())


class ParamSnapshot:
    """A copy of the owned parameter ranges taken before an optimizer step."""

    def __init__(self, parts: list[OwnedPart]):
        self.parts = parts
        self.copies = [part.values().clone() for part in parts]

    def update_ratio(self, device: torch.device) -> tuple[float, float, float]:
        """(||W_before||, ||W_after||, ||W_after - W_before|| / ||W_before||); a collective."""
        sums = torch.zeros(3, dtype=torch.float64, device=device)
        for part, before in zip(self.parts, self.copies):
            after = part.values()
            sums[0] += torch.linalg.vector_norm(before, dtype=torch.float64).square()
            sums[1] += torch.linalg.vector_norm(after, dtype=torch.float64).square()
            delta = after.float() - before.float()
            sums[2] += torch.linalg.vector_norm(delta, dtype=torch.float64).square()
        norm_before, norm_after, norm_delta = _all_reduce_sum(sums).sqrt().tolist()
        ratio = norm_delta / norm_before if norm_before > 0 else float("nan")
        return norm_before, norm_after, ratio
