"""Training batches cut from the token stream by absolute position.

A step that starts at stream position ``start`` with ``G`` sequences of length ``L`` uses global
sequence ``k`` (0 <= k < G) = stream tokens ``[start + k*L, start + (k+1)*L + 1)``: L inputs plus
the one extra token that the shifted labels need. Consecutive sequences share that one token, so
no token is thrown away, and the next step starts at ``start + G*L``.

Data-parallel rank ``r`` of ``dp`` with ``M = G / (m * dp)`` micro-batches of ``m`` sequences
reads global sequences ``[r*M*m, (r+1)*M*m)`` (one contiguous read); its micro-batch ``j`` holds
sequences ``[(r*M + j)*m, (r*M + j + 1)*m)``. The set of sequences in a step therefore depends
only on ``(start, G, L)``, never on ``dp`` or ``m``: a run resumed on another layout continues
with exactly the same data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from megatron_ext.config.errors import ConfigError, Problem
from megatron_ext.data.token_stream import TokenStream


@dataclass(frozen=True)
class BatchRequest:
    """What one step reads: its stream position, batch size in sequences and sequence length."""

    consumed_tokens: int
    global_batch_size: int
    seq_length: int
    step: int = 0
    """Only used in messages and by the consumer to check it got the step it expected."""


def num_microbatches(global_batch_size: int, micro_batch_size: int, data_parallel_size: int) -> int:
    """Gradient-accumulation steps per optimizer step; ConfigError when the batch cannot be kept."""
    per_pass = micro_batch_size * data_parallel_size
    if micro_batch_size < 1 or data_parallel_size < 1:
        raise ConfigError(
            [
                Problem(
                    "schedule.micro_batch_size",
                    micro_batch_size,
                    f"micro_batch_size and data-parallel size ({data_parallel_size}) must be >= 1",
                    "use a positive micro batch size",
                )
            ]
        )
    if global_batch_size < per_pass or global_batch_size % per_pass != 0:
        lower = (global_batch_size // per_pass) * per_pass
        upper = lower + per_pass
        options = [str(v) for v in (lower, upper) if v > 0]
        micro_options = [
            str(mb)
            for mb in range(1, micro_batch_size + 1)
            if global_batch_size % (mb * data_parallel_size) == 0
        ]
        fix = f"use global_batch_size in {{{', '.join(options)}}}"
        if micro_options:
            fix += f", or micro_batch_size in {{{', '.join(micro_options[-3:])}}}"
        fix += ", or another data-parallel size that divides the global batch"
        raise ConfigError(
            [
                Problem(
                    "schedule.global_batch_size",
                    global_batch_size,
                    f"not divisible by micro_batch_size*data_parallel_size="
                    f"{micro_batch_size}*{data_parallel_size}={per_pass}",
                    fix,
                )
            ]
        )
    return global_batch_size // per_pass


def rank_sequence_range(
    global_batch_size: int, micro_batch_size: int, dp_rank: int, dp_size: int
) -> tuple[int, int]:
    """(first global sequence, number of sequences) that data-parallel rank ``dp_rank`` reads."""
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank={dp_rank} outside [0, {dp_size})")
    per_rank = num_microbatches(global_batch_size, micro_batch_size, dp_size) * micro_batch_size
    return dp_rank * per_rank, per_rank


def get_step_batch(
    stream: TokenStream,
    consumed_tokens: int,
    global_batch_size: int,
    seq_length: int,
    dp_rank: int,
    dp_size: int,
    micro_batch_size: int,
    *,
    eod_mask_loss: bool = False,
    reset_position_ids: bool = False,
) -> list[dict[str, torch.Tensor]]:
    """This rank's micro-batches of the step that starts at ``consumed_tokens``.

    Each micro-batch is ``{"tokens", "labels", "position_ids"}`` int64 ``[m, L]`` and
    ``"loss_mask"`` float32 ``[m, L]`` (batch-first, as megatron-core's GPTModel takes them).
    ``loss_mask`` is 1 everywhere, except 0 where the input token is the end-of-document token
    when ``eod_mask_loss`` is set (Megatron's rule: do not predict a document's first token from
    the end of the previous one).
    """
    if seq_length < 1:
        raise ValueError(f"seq_length must be >= 1, got {seq_length}")
    if (eod_mask_loss or reset_position_ids) and stream.eod_token_id is None:
        raise ValueError("eod_mask_loss / reset_position_ids need the stream's eod_token_id")
    first, count = rank_sequence_range(global_batch_size, micro_batch_size, dp_rank, dp_size)
    window = stream.read(consumed_tokens + first * seq_length, count * seq_length + 1)
    tokens = window[:-1].reshape(count, seq_length)
    labels = window[1:].reshape(count, seq_length)
    loss_mask = np.ones((count, seq_length), dtype=np.float32)
    if eod_mask_loss:
        loss_mask[tokens == stream.eod_token_id] = 0.0
    position_ids = np.broadcast_to(np.arange(seq_length, dtype=np.int64), (count, seq_length))
    if reset_position_ids:
        position_ids = _reset_positions(tokens, stream.eod_token_id)
    micro_batches = []
    for j in range(0, count, micro_batch_size):
        rows = slice(j, j + micro_batch_size)
        micro_batches.append(
            {
                "tokens": torch.from_numpy(np.ascontiguousarray(tokens[rows])),
                "labels": torch.from_numpy(np.ascontiguousarray(labels[rows])),
                "loss_mask": torch.from_numpy(np.ascontiguousarray(loss_mask[rows])),
                "position_ids": torch.from_numpy(np.array(position_ids[rows])),
            }
        )
    return micro_batches


def split_micro_batches(
    rows: torch.Tensor, micro_batch_size: int, loss_mask: torch.Tensor | None = None
) -> list[dict[str, torch.Tensor]]:
    """Micro-batches of ``rows`` (``[n, L + 1]`` token ids, each row one sequence plus the token
    after it): inputs, labels shifted by one, the loss mask (all ones unless given, ``[n, L]``)
    and positions ``0..L-1``. For callers that already hold token rows (tools, benchmarks, tests).
    """
    count, width = rows.shape
    if count % micro_batch_size:
        raise ValueError(f"{count} rows do not split into micro-batches of {micro_batch_size}")
    seq_length = width - 1
    mask = torch.ones(count, seq_length) if loss_mask is None else loss_mask
    positions = torch.arange(seq_length).expand(micro_batch_size, seq_length)
    return [
        {
            "tokens": rows[i : i + micro_batch_size, :-1],
            "labels": rows[i : i + micro_batch_size, 1:],
            "loss_mask": mask[i : i + micro_batch_size],
            "position_ids": positions,
        }
        for i in range(0, count, micro_batch_size)
    ]


def get_eval_batches(
    stream: TokenStream,
    num_batches: int,
    global_batch_size: int,
    seq_length: int,
    dp_rank: int,
    dp_size: int,
    micro_batch_size: int,
    **options: bool,
) -> list[list[dict[str, torch.Tensor]]]:
    """The fixed evaluation batches: batch ``i`` starts at ``i * global_batch_size * seq_length``
    of the validation stream, so every evaluation of the run sees the same tokens."""
    step_tokens = global_batch_size * seq_length
    return [
        get_step_batch(
            stream,
            i * step_tokens,
            global_batch_size,
            seq_length,
            dp_rank,
            dp_size,
            micro_batch_size,
            **options,
        )
        for i in range(num_batches)
    ]


def _reset_positions(tokens: np.ndarray, eod_token_id: int) -> np.ndarray:
    """Positions that restart at 0 after each end-of-document token, per row."""
    rows, length = tokens.shape
    index = np.broadcast_to(np.arange(length, dtype=np.int64), (rows, length))
    after_eod = np.zeros((rows, length), dtype=bool)
    after_eod[:, 1:] = tokens[:, :-1] == eod_token_id
    restart = np.maximum.accumulate(np.where(after_eod, index, 0), axis=1)
    return index - restart
