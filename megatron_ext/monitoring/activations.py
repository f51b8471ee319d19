"""Per-layer activation statistics and gradient norms, reduced exactly over all ranks.

For every transformer layer three sites are watched with forward hooks: the attention output
(``self_attention`` returns ``(output, bias)``, both ``[s, b, h]``), the MLP output (``mlp``, same
form) and the residual stream leaving the layer (``TransformerLayer`` returns ``(output,
context)``). Each hook adds, per site, the count, sum, sum of squares, counts near the bf16 / FP8
limits and of non-finite values (as float64) and keeps the absolute maximum; nothing leaves the
device until the step ends. Then one SUM and one MAX all-reduce over all ranks give exact global
numbers:

- sequence parallel (and context parallel) shard activations along the sequence: every rank adds
  its shard; without sequence parallel the TP ranks hold identical copies and only TP rank 0 adds;
- data-parallel ranks see different samples and all add; pipeline stages add their own layers.

"Near a limit" means ``|x| >= max / 2``: the value sits in the top binade of the format, one
doubling from overflow (bf16 max 3.39e38, FP8 e4m3 448, e5m2 57344); infinities count as near.
``std`` is the population standard deviation over all values (ddof=0), ``rms = sqrt(mean(x^2))``.
Hook calls made while autograd recomputes a checkpointed forward in the backward pass are ignored,
so activation recomputation does not count a micro-batch twice. Layers whose ``forward`` was
replaced by a ``torch.compile`` wrapper (an instance attribute, see models.fast_path) run their
eager forward while the hooks are attached: hooks inside a compiled region would force graph
breaks or recompilation, so a statistics step costs one eager step instead.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist

from megatron_ext.monitoring.model_view import OwnedPart

SITES = ("attention", "mlp", "residual")
LIMITS = {
    "bf16": float(torch.finfo(torch.bfloat16).max),
    "e4m3": 448.0,
    "e5m2": 57344.0,
}
# Columns of the per-site sum vector.
_COUNT, _SUM, _SUMSQ, _NEAR_BF16, _NEAR_E4M3, _NEAR_E5M2, _NONFINITE = range(7)
_NUM_SUMS = 7
OTHER_GROUPS = ("embedding", "output_layer", "final_layernorm", "other")


def tensor_sums(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float64 vector of the 7 additive statistics, float64 absolute max) of one tensor."""
    x = x.detach()
    # Reductions accumulate in float64 on the fly; only |x| and masks are materialised (the limit
    # thresholds are exact in bf16/fp16, so comparing in the input's dtype is exact).
    magnitude = x.abs()
    sums = torch.stack(
        [
            torch.full((), float(x.numel()), dtype=torch.float64, device=x.device),
            x.sum(dtype=torch.float64),
            torch.linalg.vector_norm(x, dtype=torch.float64).square(),
            (magnitude >= LIMITS["bf16"] / 2).sum().double(),
            (magnitude >= LIMITS["e4m3"] / 2).sum().double(),
            (magnitude >= LIMITS["e5m2"] / 2).sum().double(),
            (~torch.isfinite(x)).sum().double(),
        ]
    )
    abs_max = magnitude.max().double() if x.numel() else torch.zeros((), dtype=torch.float64)
    return sums, abs_max


def summarize(sums: torch.Tensor, abs_max: float) -> dict[str, float]:
    """Statistics of one site from its global sums (see the module docstring)."""
    count = float(sums[_COUNT])
    if count == 0:
        return {}
    mean = float(sums[_SUM]) / count
    mean_sq = float(sums[_SUMSQ]) / count
    variance = mean_sq - mean * mean
    variance = 0.0 if variance < 0 else variance  # rounding; NaN passes through
    return {
        "mean": mean,
        "std": math.sqrt(variance),
        "rms": math.sqrt(mean_sq),
        "abs_max": float(abs_max),
        "frac_near_bf16_max": float(sums[_NEAR_BF16]) / count,
        "frac_near_e4m3_max": float(sums[_NEAR_E4M3]) / count,
        "frac_near_e5m2_max": float(sums[_NEAR_E5M2]) / count,
        "frac_nonfinite": float(sums[_NONFINITE]) / count,
    }


class ActivationStats:
    """Forward hooks on this rank's layers that accumulate statistics between attach and detach."""

    def __init__(
        self,
        layers: list[tuple[int, torch.nn.Module]],
        num_layers: int,
        counts_activations: bool,
        device: torch.device,
    ):
        """``layers``: (global index, TransformerLayer); ``counts_activations``: this rank adds
        its activations (False on TP ranks > 0 without sequence parallelism)."""
        self.layers = layers
        self.num_layers = num_layers
        self.counts_activations = counts_activations
        self.device = device
        self.handles: list[Any] = []
        self.compiled_forwards: dict[int, Any] = {}
        self.sums = torch.zeros(
            num_layers, len(SITES), _NUM_SUMS, dtype=torch.float64, device=device
        )
        self.maxes = torch.zeros(num_layers, len(SITES), dtype=torch.float64, device=device)

    @property
    def attached(self) -> bool:
        return bool(self.handles) or bool(self.compiled_forwards)

    def attach(self) -> None:
        """Zero the accumulators and register the hooks (idempotent)."""
        if self.attached:
            return
        self.sums.zero_()
        self.maxes.zero_()
        for index, layer in self.layers:
            # Compiled layers keep their wrapper in the instance dict; the class's forward is eager.
            # Every rank switches, so all ranks run the same code on this step.
            if "forward" in vars(layer):
                self.compiled_forwards[index] = vars(layer).pop("forward")
        if not self.counts_activations:
            return
        for index, layer in self.layers:
            modules = (layer.self_attention, layer.mlp, layer)
            for site, module in enumerate(modules):
                self.handles.append(module.register_forward_hook(self._hook(index, site)))

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        for index, layer in self.layers:
            if index in self.compiled_forwards:
                layer.forward = self.compiled_forwards.pop(index)

    def _hook(self, index: int, site: int):
        def hook(module: torch.nn.Module, inputs: Any, output: Any) -> None:
            # -1 outside the autograd engine; anything else is a recompute inside backward.
            if torch._C._current_graph_task_id() != -1:
                return
            tensor = output
            if isinstance(output, (tuple, list)):
                tensor = output[0]
                bias = output[1] if len(output) > 1 and site < 2 else None
                if isinstance(bias, torch.Tensor):
                    tensor = tensor + bias
            with torch.no_grad():
                sums, abs_max = tensor_sums(tensor)
                self.sums[index, site] += sums
                self.maxes[index, site] = torch.maximum(self.maxes[index, site], abs_max)

        return hook


def grad_sq_sums(parts: list[OwnedPart], num_layers: int, device: torch.device) -> torch.Tensor:
    """float64 [num_layers + 4]: this rank's squared gradient sums per layer, then per group of
    ``OTHER_GROUPS``; summed over all ranks they are the squared per-layer gradient norms."""
    out = torch.zeros(num_layers + len(OTHER_GROUPS), dtype=torch.float64, device=device)
    for part in parts:
        grad = part.grad()
        if grad is None:
            continue
        slot = part.layer if part.layer is not None else num_layers + _other_group(part.name)
        out[slot] += torch.linalg.vector_norm(grad, dtype=torch.float64).square()
    return out


def _other_group(name: str) -> int:
    if name.startswith("embedding."):
        return 0
    if name.startswith("output_layer."):
        return 1
    if name.startswith("decoder.final_layernorm."):
        return 2
    return 3


def reduce_layer_stats(
    act_sums: torch.Tensor, act_maxes: torch.Tensor, grad_sq: torch.Tensor | None
) -> dict[str, Any]:
    """All-reduce (SUM, MAX over all ranks) and turn the sums into per-layer statistics."""
    num_layers = act_sums.shape[0]
    flat = [act_sums.reshape(-1)] + ([grad_sq] if grad_sq is not None else [])
    summed = torch.cat(flat)
    maxes = act_maxes.clone()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(summed, op=dist.ReduceOp.SUM)
        dist.all_reduce(maxes, op=dist.ReduceOp.MAX)
    summed = summed.cpu()
    maxes = maxes.cpu()
    sums = summed[: act_sums.numel()].view(act_sums.shape)
    layers = []
    for index in range(num_layers):
        entry: dict[str, Any] = {"layer": index}
        for site, name in enumerate(SITES):
            stats = summarize(sums[index, site], float(maxes[index, site]))
            if stats:
                entry[name] = stats
        layers.append(entry)
    result: dict[str, Any] = {"layers": layers}
    if grad_sq is not None:
        grads = summed[act_sums.numel() :].sqrt().tolist()
        for index in range(num_layers):
            layers[index]["grad_norm"] = grads[index]
        result["grad_norm_other"] = dict(zip(OTHER_GROUPS, grads[num_layers:]))
    return result


def flatten_layer_stats(stats: dict[str, Any]) -> dict[str, float]:
    """TensorBoard/wandb tags: ``layers/<site>_<stat>/<layer>`` and ``layers/grad_norm/<layer>``."""
    flat: dict[str, float] = {}
    for entry in stats.get("layers", []):
        layer = f"{entry['layer']:03d}"
        for site in SITES:
            for stat, value in entry.get(site, {}).items():
                flat[f"layers/{site}_{stat}/{layer}"] = value
        if "grad_norm" in entry:
            flat[f"layers/grad_norm/{layer}"] = entry["grad_norm"]
    for group, value in stats.get("grad_norm_other", {}).items():
        flat[f"layers/grad_norm/{group}"] = value
    return flat
