"""megatron-core's tensor-parallel linear layers, as the local spec uses them.

Two changes, neither touching parameters, checkpoints or the forward's numerics:

* ``LocalRowParallelLinear`` passes its own ``tp_group`` to the matmul. megatron-core's
  ``RowParallelLinear.forward`` passes ``tp_group=None``, which megatron-core 0.16 resolves to the
  default group with a ``DeprecationWarning`` (on global rank 0, on every call). Harmless in
  eager mode, but ``torch.compile`` cannot trace ``warnings.warn``: each compiled
  ``TransformerLayer.forward`` broke there, at both row-parallel linears, and because the first
  break falls inside a context manager Dynamo cannot resume, the layer's own frame ran eagerly with
  only its callees compiled piece by piece. With the group bound, a local layer compiles as one
  graph on one GPU. (For the row-parallel matmul the group is only carried along: no all-reduce of
  the input gradient and no sequence-parallel gather happen inside it.)
* Both classes can accumulate the weight gradient straight into DDP's ``main_grad``
  (``wgrad_fusion``) when ``accumulate_wgrad_in_main_grad`` is set on them (the model builder does
  that for ``model.wgrad_fusion``) and the call needs no tensor-parallel communication inside the
  matmul (no bias, no input-gradient all-reduce, no sequence parallelism) and the weight has a
  ``main_grad`` (it is wrapped in megatron-core's DDP). Other calls take megatron-core's path.
"""

from __future__ import annotations

from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

from megatron_ext.models.wgrad_fusion import linear_into_main_grad


def _fusable(weight, args: tuple, kwargs: dict) -> bool:
    """Whether megatron-core's matmul call reduces to ``input @ weight^T`` plus its gradients."""
    return (
        not args  # megatron-core passes everything by keyword; anything else takes its path
        and weight.requires_grad
        and getattr(weight, "main_grad", None) is not None
        and kwargs.get("bias") is None
        and not kwargs.get("allreduce_dgrad")
        and not kwargs.get("sequence_parallel")
        and kwargs.get("grad_output_buffer") is None
    )


class _WgradIntoMainGrad:
    """Mixin for megatron-core's parallel linear layers: the ``_forward_impl`` seam."""

    accumulate_wgrad_in_main_grad = False

    def _forward_impl(self, input, weight, *args, **kwargs):
        if self.accumulate_wgrad_in_main_grad and _fusable(weight, args, kwargs):
            return linear_into_main_grad(input, weight)
        return super()._forward_impl(input, weight, *args, **kwargs)


class LocalColumnParallelLinear(_WgradIntoMainGrad, ColumnParallelLinear):
    """``ColumnParallelLinear`` that can accumulate its weight gradient into ``main_grad``."""


class LocalRowParallelLinear(_WgradIntoMainGrad, RowParallelLinear):
    """``RowParallelLinear`` that hands its ``tp_group`` to the matmul instead of ``None`` and can
    accumulate its weight gradient into ``main_grad``."""

    def _forward_impl(self, input, weight, *args, tp_group=None, **kwargs):
        group = self.tp_group if tp_group is None else tp_group
        return super()._forward_impl(input, weight, *args, tp_group=group, **kwargs)


LOCAL_LINEAR_CLASSES = (LocalColumnParallelLinear, LocalRowParallelLinear)
