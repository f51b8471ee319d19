"""Cross-entropy over the (vocabulary-parallel) logits without an fp32 copy of them.

megatron-core's ``vocab_parallel_cross_entropy`` upcasts the whole ``[s, b, V/tp]`` logits to fp32
and keeps the fp32 softmax for the backward: for 8,192 tokens and a 65,536 vocabulary that is
2 GiB per fp32 tensor next to the 1 GiB of bf16 logits, and about ten full passes over memory.

``chunked_cross_entropy`` reads the logits in row chunks (fp32 only inside a chunk):

1. per row, the local max, the sum of ``exp(x - max)`` and the target's logit (the target lives on
   exactly one tensor-parallel rank); three ``[N]`` all-reduces combine them across the TP group;
2. per row, ``loss = log(sum) + max - target_logit``;
3. the gradient ``softmax - one_hot`` is written in the logits' dtype during the forward, so the
   logits themselves are not kept for the backward; the backward only scales it by the incoming
   per-token gradient.

On CUDA the two per-chunk functions are compiled (each becomes a fused reduction or pointwise
kernel); on CPU they run eagerly. ``ChunkedLossGPTModel`` is megatron-core's ``GPTModel`` with
this loss in its ``compute_language_model_loss`` seam; all else, checkpoints included, is unchanged.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.models.gpt import GPTModel

# fp32 elements per chunk (64 Mi = 256 MiB): 1,024 rows of a 65,536 vocabulary.
_CHUNK_ELEMENTS = 1 << 26


def _chunk_stats(
    logits: torch.Tensor, target: torch.Tensor, in_range: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row max, sum of ``exp(x - max)`` and target logit (0 off this rank) of ``[r, V]`` logits."""
    x = logits.float()
    row_max = x.amax(dim=-1)
    sum_exp = torch.exp(x - row_max.unsqueeze(-1)).sum(dim=-1)
    target_logit = x.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    return row_max, sum_exp, torch.where(in_range, target_logit, torch.zeros_like(target_logit))


def _chunk_grad(
    logits: torch.Tensor, log_sum_exp: torch.Tensor, target: torch.Tensor, in_range: torch.Tensor
) -> torch.Tensor:
    """``softmax - one_hot(target)`` of ``[r, V]`` logits, in the logits' dtype."""
    probs = torch.exp(logits.float() - log_sum_exp.unsqueeze(-1))
    columns = torch.arange(logits.shape[-1], device=logits.device)
    one_hot = (columns.unsqueeze(0) == target.unsqueeze(-1)) & in_range.unsqueeze(-1)
    return (probs - one_hot.float()).to(logits.dtype)


_compiled: dict[str, object] = {}


def _kernels(device: torch.device):
    """The per-chunk functions: compiled into fused kernels on CUDA, eager elsewhere."""
    if device.type != "cuda":
        return _chunk_stats, _chunk_grad
    if not _compiled:
        _compiled["stats"] = torch.compile(_chunk_stats)
        _compiled["grad"] = torch.compile(_chunk_grad)
    return _compiled["stats"], _compiled["grad"]


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, tp_group, chunk_rows):
        num_rows, vocab_local = logits.shape
        tp_rank = dist.get_rank(tp_group) if tp_group is not None else 0
        vocab_start = tp_rank * vocab_local
        local_target = target - vocab_start
        in_range = (local_target >= 0) & (local_target < vocab_local)
        local_target = torch.where(in_range, local_target, torch.zeros_like(local_target))
        stats_fn, grad_fn = _kernels(logits.device)

        row_max = torch.empty(num_rows, dtype=torch.float32, device=logits.device)
        sum_exp = torch.empty_like(row_max)
        target_logit = torch.empty_like(row_max)
        for start in range(0, num_rows, chunk_rows):
            rows = slice(start, start + chunk_rows)
            m, s, t = stats_fn(logits[rows], local_target[rows], in_range[rows])
            row_max[rows], sum_exp[rows], target_logit[rows] = m, s, t

        if tp_group is not None and dist.get_world_size(tp_group) > 1:
            global_max = row_max.clone()
            dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=tp_group)
            sum_exp *= torch.exp(row_max - global_max)
            dist.all_reduce(sum_exp, group=tp_group)
            dist.all_reduce(target_logit, group=tp_group)
            row_max = global_max
        log_sum_exp = torch.log(sum_exp) + row_max
        loss = log_sum_exp - target_logit

        grad = torch.empty_like(logits)
        for start in range(0, num_rows, chunk_rows):
            rows = slice(start, start + chunk_rows)
            grad[rows] = grad_fn(
                logits[rows], log_sum_exp[rows], local_target[rows], in_range[rows]
            )
        # Kept outside save_for_backward: the backward scales it in place (no second buffer), so
        # a second backward through the same graph would be wrong and is refused instead.
        ctx.grad = grad
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad = ctx.grad
        if grad is None:
            raise RuntimeError(
                "chunked_cross_entropy supports one backward per forward (retain_graph is not "
                "supported); use fused_cross_entropy=off for double backward"
            )
        ctx.grad = None
        grad.mul_(grad_loss.unsqueeze(-1).to(grad.dtype))
        return grad, None, None, None


def chunked_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    tp_group: dist.ProcessGroup | None = None,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """Per-token cross-entropy of vocabulary-parallel ``logits [..., V/tp]`` and ``target [...]``.

    ``target`` holds global token ids; rank ``r`` of ``tp_group`` holds vocabulary rows
    ``[r * V/tp, (r + 1) * V/tp)`` (megatron-core's layout). Returns fp32 losses shaped like
    ``target``. ``chunk_rows`` defaults to 256 MiB of fp32 per chunk.
    """
    if logits.shape[:-1] != target.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and target {tuple(target.shape)} disagree: logits "
            "must be target's shape plus a vocabulary dimension"
        )
    vocab_local = logits.shape[-1]
    if chunk_rows is None:
        chunk_rows = max(1, _CHUNK_ELEMENTS // vocab_local)
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be positive, got {chunk_rows}")
    flat_logits = logits.reshape(-1, vocab_local)
    flat_target = target.reshape(-1).long()
    loss = _ChunkedCrossEntropy.apply(flat_logits, flat_target, tp_group, chunk_rows)
    return loss.view(target.shape)


class ChunkedLossGPTModel(GPTModel):
    """megatron-core's ``GPTModel`` with ``chunked_cross_entropy`` as its language-model loss."""

    def compute_language_model_loss(self, labels: torch.Tensor, logits: torch.Tensor):
        # labels [b, s], logits [s, b, V/tp] -> loss [b, s] (as megatron-core returns it)
        target = labels.transpose(0, 1).contiguous()
        loss = chunked_cross_entropy(logits, target, tp_group=self.pg_collection.tp)
        return loss.transpose(0, 1).contiguous()
