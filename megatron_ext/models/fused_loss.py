"""Cross-entropy over the (vocabulary-parallel) logits without an fp32 copy of them.

megatron-core's ``vocab_parallel_cross_entropy`` upcasts the whole ``[s, b, V/tp]`` logits to fp32
and keeps the fp32 softmax for the backward: for 8,192 tokens and a 65,536 vocabulary that is
2 GiB per fp32 tensor next to the 1 GiB of bf16 logits, and about ten full passes over memory.

``chunked_cross_entropy`` reads the logits in row chunks (fp32 only inside a chunk):

1. per row, the local max, the sum of ``exp(x - max)`` and the target's logit (the target lives on
   exactly one tensor-parallel rank); three ``[N]`` all-reduces combine them across the TP group;
2. per row, ``loss = log(sum) + max - target_logit``;
3. the backward computes the gradient ``grad_loss * (softmax - one_hot)`` per chunk from the
   saved logits and the saved ``log(sum) + max``, in fp32, rounded once to the logits' dtype.

So the logits are read twice and the gradient written once: no fp32 copy, no gradient kept from
the forward to the backward, no separate pass that scales it. ``ChunkedLossGPTModel`` also lets the
backward write the gradient over the logits (``overwrite_logits``): they are its own temporary,
read by nothing else, so the loss needs no memory beyond the bf16 logits.

On CUDA the two per-chunk functions are compiled (a fused reduction, and a pointwise kernel that
writes the gradient in place); on CPU they run eagerly. ``ChunkedLossGPTModel`` is megatron-core's
``GPTModel`` with this loss in its ``compute_language_model_loss`` seam; all else, checkpoints
included, is unchanged.
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


def _chunk_grad_(
    logits: torch.Tensor,
    log_sum_exp: torch.Tensor,
    target: torch.Tensor,
    in_range: torch.Tensor,
    grad_loss: torch.Tensor,
) -> None:
    """Overwrite ``[r, V]`` logits with ``grad_loss * (softmax - one_hot(target))``, computed in
    fp32 and rounded once to the logits' dtype."""
    probs = torch.exp(logits.float() - log_sum_exp.unsqueeze(-1))
    columns = torch.arange(logits.shape[-1], device=logits.device)
    one_hot = (columns.unsqueeze(0) == target.unsqueeze(-1)) & in_range.unsqueeze(-1)
    logits.copy_((probs - one_hot.float()) * grad_loss.unsqueeze(-1))


_compiled: dict[str, object] = {}


def _kernels(device: torch.device):
    """The per-chunk functions: compiled into fused kernels on CUDA, eager elsewhere."""
    if device.type != "cuda":
        return _chunk_stats, _chunk_grad_
    if not _compiled:
        _compiled["stats"] = torch.compile(_chunk_stats)
        _compiled["grad"] = torch.compile(_chunk_grad_)
    return _compiled["stats"], _compiled["grad"]


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, tp_group, chunk_rows, overwrite_logits):
        num_rows, vocab_local = logits.shape
        tp_rank = dist.get_rank(tp_group) if tp_group is not None else 0
        vocab_start = tp_rank * vocab_local
        local_target = target - vocab_start
        in_range = (local_target >= 0) & (local_target < vocab_local)
        local_target = torch.where(in_range, local_target, torch.zeros_like(local_target))
        stats_fn, _ = _kernels(logits.device)

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
        ctx.save_for_backward(logits, log_sum_exp, local_target, in_range)
        ctx.chunk_rows = chunk_rows
        ctx.overwrite_logits = overwrite_logits
        ctx.used = False
        return log_sum_exp - target_logit

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.used:  # with overwrite_logits the saved logits are gone; refused either way
            raise RuntimeError(
                "chunked_cross_entropy supports one backward per forward (retain_graph is not "
                "supported); use fused_cross_entropy=off for double backward"
            )
        ctx.used = True
        logits, log_sum_exp, target, in_range = ctx.saved_tensors
        _, grad_fn = _kernels(logits.device)
        # One in-place kernel per chunk; a copy first where the logits must survive.
        grad = logits if ctx.overwrite_logits else logits.clone()
        grad_loss = grad_loss.float()
        for start in range(0, grad.shape[0], ctx.chunk_rows):
            rows = slice(start, start + ctx.chunk_rows)
            grad_fn(grad[rows], log_sum_exp[rows], target[rows], in_range[rows], grad_loss[rows])
        return grad, None, None, None, None


def chunked_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    tp_group: dist.ProcessGroup | None = None,
    chunk_rows: int | None = None,
    overwrite_logits: bool = False,
) -> torch.Tensor:
    """Per-token cross-entropy of vocabulary-parallel ``logits [..., V/tp]`` and ``target [...]``.

    ``target`` holds global token ids; rank ``r`` of ``tp_group`` holds vocabulary rows
    ``[r * V/tp, (r + 1) * V/tp)`` (megatron-core's layout). Returns fp32 losses shaped like
    ``target``. ``chunk_rows`` defaults to 256 MiB of fp32 per chunk.

    ``overwrite_logits``: the backward writes the logits' gradient over the logits instead of into
    a new tensor. Only for logits that nothing reads after this loss's backward (a model's own
    intermediate); a leaf that requires grad is refused. Without a backward nothing is written.
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
    if overwrite_logits and logits.requires_grad and logits.is_leaf:
        raise ValueError(
            "overwrite_logits=True would overwrite a leaf tensor's values with its gradient: use "
            "it only for a model's intermediate logits"
        )
    flat_logits = logits.reshape(-1, vocab_local)
    flat_target = target.reshape(-1).long()
    loss = _ChunkedCrossEntropy.apply(
        flat_logits, flat_target, tp_group, chunk_rows, overwrite_logits
    )
    return loss.view(target.shape)


class ChunkedLossGPTModel(GPTModel):
    """megatron-core's ``GPTModel`` with ``chunked_cross_entropy`` as its language-model loss."""

    def compute_language_model_loss(self, labels: torch.Tensor, logits: torch.Tensor):
        # labels [b, s], logits [s, b, V/tp] -> loss [b, s] (as megatron-core returns it)
        target = labels.transpose(0, 1).contiguous()
        # The logits are this forward's own temporary: the backward overwrites them with their
        # gradient instead of allocating another [s, b, V/tp] tensor.
        loss = chunked_cross_entropy(
            logits, target, tp_group=self.pg_collection.tp, overwrite_logits=True
        )
        return loss.transpose(0, 1).contiguous()
