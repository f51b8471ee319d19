"""The CPU compatibility layer is switched on only for CPU and is fully reversible."""

from __future__ import annotations

import pytest
import torch

from megatron_ext.parallel import cpu_compat


@pytest.fixture(autouse=True)
def _restore():
    yield
    cpu_compat.uninstall_cpu_compat()


def test_cuda_request_installs_nothing():
    """A GPU run never installs the layer: requesting cuda either uses the GPU as is, or (here,
    without one) refuses clearly; torch.cuda stays untouched either way."""
    before = (torch.cuda.current_device, torch.cuda.Event, torch.Tensor.cuda)
    if torch.cuda.is_available():
        assert cpu_compat.activate_device("cuda") == "cuda"
    else:
        with pytest.raises(ValueError, match="no CUDA device"):
            cpu_compat.activate_device("cuda")
    assert not cpu_compat.is_cpu_compat_installed()
    assert (torch.cuda.current_device, torch.cuda.Event, torch.Tensor.cuda) == before


def test_auto_resolves_to_the_available_device():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert cpu_compat.resolve_device("auto") == expected
    with pytest.raises(ValueError, match="auto, cpu or cuda"):
        cpu_compat.resolve_device("tpu")


def test_cpu_maps_megatron_cuda_idioms_and_uninstalls():
    original_current_device = torch.cuda.current_device
    assert cpu_compat.activate_device("cpu") == "cpu"
    assert cpu_compat.is_cpu_compat_installed()
    x = torch.empty(3, device=torch.cuda.current_device())
    assert x.device.type == "cpu"
    assert torch.zeros(2, device="cuda").device.type == "cpu"
    assert x.cuda() is x
    assert x.to("cuda:0").device.type == "cpu"
    assert torch.ones(2).type() == "torch.cuda.FloatTensor"
    assert torch.ones(2, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    end.record()
    assert end.elapsed_time(start) <= 0.0 <= start.elapsed_time(end)
    # The "CUDA" RNG is the CPU generator dropout draws from.
    state = torch.cuda.get_rng_state()
    a = torch.rand(4)
    torch.cuda.set_rng_state(state)
    assert torch.equal(torch.rand(4), a)
    cpu_compat.uninstall_cpu_compat()
    assert torch.cuda.current_device is original_current_device
    assert torch.ones(2).type() == "torch.FloatTensor"


def test_redirection_reaches_custom_backward():
    """megatron-core's autograd Functions allocate on the 'current CUDA device' in backward."""
    cpu_compat.install_cpu_compat()

    class Double(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, grad):
            return grad * 2 + torch.zeros(1, device=torch.cuda.current_device())

    x = torch.ones(3, requires_grad=True)
    Double.apply(x).sum().backward()
    assert torch.equal(x.grad, torch.full((3,), 2.0))
