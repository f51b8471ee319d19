"""megatron-core's ``RowParallelLinear`` with its own tensor-parallel group passed to the matmul.

``RowParallelLinear.forward`` calls its matmul with ``tp_group=None``, and megatron-core 0.16
resolves ``None`` to the default group with a ``DeprecationWarning`` (on global rank 0, on every
call). The warning is harmless in eager mode, but ``torch.compile`` cannot trace
``warnings.warn``: each compiled ``TransformerLayer.forward`` breaks there, at both row-parallel
linears (attention output and MLP output), and because the first break happens inside a context
manager Dynamo cannot resume, the layer's own frame runs eagerly with only its callees compiled
piece by piece. With the group bound here the local layer compiles as one graph on one GPU.

The group is the same one megatron-core would resolve (this layer's ``tp_group``); for the row
parallel matmul it is only carried along (no all-reduce of the input gradient, no sequence-parallel
gather happen inside it). Parameters, checkpoints and numerics are unchanged.
"""

from __future__ import annotations

from megatron.core.tensor_parallel.layers import RowParallelLinear


class GroupBoundRowParallelLinear(RowParallelLinear):
    """``RowParallelLinear`` that hands its ``tp_group`` to the matmul instead of ``None``."""

    def _forward_impl(self, input, weight, *args, tp_group=None, **kwargs):
        group = self.tp_group if tp_group is None else tp_group
        return super()._forward_impl(input, weight, *args, tp_group=group, **kwargs)
