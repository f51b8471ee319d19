"""Run megatron-core's real code paths on CPU over gloo.

megatron-core assumes CUDA: it allocates with ``device=torch.cuda.current_device()`` or
``device="cuda"``, calls ``.cuda()``, synchronises streams and events, forks the CUDA RNG state for
tensor-parallel dropout/initialisation and checks ``param.type() == "torch.cuda.FloatTensor"``
in its optimizers. None of that is wrong on a GPU, and none of it is needed to *compute* the same
thing on a CPU. This module maps exactly those calls to CPU so that tensor-parallel layers (with
sequence parallel), the pipeline schedules, ``DistributedDataParallel``, the distributed optimizer
and ``dist_checkpointing`` run unmodified, which is what makes multi-process CPU tests of the real
parallel code possible.

It is opt-in: ``install_cpu_compat()`` is called only when the resolved device is ``cpu``
(``parallel.device: cpu``, or ``auto`` on a machine without CUDA). On a GPU machine nothing here
runs. What it changes, process-wide and reversibly (``uninstall_cpu_compat``):

* ``torch.cuda.current_device / device_count / synchronize / streams / events / nvtx / memory
  queries`` become CPU no-ops or CPU-valued equivalents.
* The "CUDA" RNG that megatron-core's ``CudaRNGStatesTracker`` forks is the CPU default generator,
  because on CPU that is the generator dropout and initialisation actually draw from.
* A ``TorchFunctionMode`` rewrites any CUDA device argument (``"cuda"``, ``"cuda:0"``, ``0``,
  ``torch.device("cuda")``) of torch factory functions, ``Tensor.to`` and ``Tensor.cuda`` to CPU,
  and answers ``Tensor.type()`` with the CUDA type name megatron-core's optimizers expect.
* The same redirection is re-entered inside custom autograd ``backward`` functions, which do
  not inherit torch-function modes.
* ``dist_checkpointing``'s file writer gets a results queue that needs no manager process, for
  synchronous and background saves alike (see ``_patch_dist_checkpointing``).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from megatron_ext.parallel.file_queue import FileQueue

_state_lock = threading.Lock()
_installed: dict[str, Any] | None = None

_CPU = torch.device("cpu")
_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
    torch.float64: "torch.cuda.DoubleTensor",
    torch.int64: "torch.cuda.LongTensor",
    torch.int32: "torch.cuda.IntTensor",
    torch.uint8: "torch.cuda.ByteTensor",
    torch.bool: "torch.cuda.BoolTensor",
}


def is_cpu_compat_installed() -> bool:
    return _installed is not None


def _is_cuda_device(value: Any) -> bool:
    if isinstance(value, torch.device):
        return value.type == "cuda"
    if isinstance(value, str):
        return value.startswith("cuda")
    # A bare int as a device means a CUDA ordinal; bools are ints but never devices here.
    return isinstance(value, int) and not isinstance(value, bool)


class _CpuDeviceMode(TorchFunctionMode):
    """Redirects CUDA device arguments to CPU; leaves everything else untouched."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            tensor = args[0]
            if tensor.device.type == "cpu" and tensor.dtype in _TYPE_NAMES:
                return _TYPE_NAMES[tensor.dtype]
        if func is torch.Tensor.record_stream:
            return None
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = dict(kwargs, device=_CPU)
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], _CPU, *args[2:])
        if func is torch.Tensor.pin_memory:
            return args[0]
        if kwargs.get("pin_memory"):
            # Pinned host memory needs a CUDA context; on CPU it is ordinary memory.
            kwargs = dict(kwargs, pin_memory=False)
        return func(*args, **kwargs)


class _Stream:
    """A CPU stand-in for ``torch.cuda.Stream``: work is synchronous, so waits are no-ops."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.device = _CPU

    def wait_stream(self, other: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def record_event(self, event: Any = None) -> _Event:
        event = event or _Event()
        event.record()
        return event

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def __enter__(self) -> _Stream:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


class _Event:
    """A CPU stand-in for ``torch.cuda.Event`` that measures wall-clock time when asked."""

    def __init__(self, enable_timing: bool = False, **kwargs: Any) -> None:
        self._time: float | None = None

    def record(self, stream: Any = None) -> None:
        import time

        self._time = time.perf_counter()

    def wait(self, stream: Any = None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, end: _Event) -> float:
        if self._time is None or end._time is None:
            raise RuntimeError("elapsed_time needs both events recorded")
        return (end._time - self._time) * 1000.0


def _cuda_replacements() -> dict[str, Any]:
    def get_rng_state(device: Any = "cuda") -> torch.Tensor:
        return torch.get_rng_state()

    def set_rng_state(state: torch.Tensor, device: Any = "cuda") -> None:
        torch.set_rng_state(state)

    def manual_seed(seed: int) -> None:
        # Not torch.manual_seed: that calls torch.cuda.manual_seed_all and would recurse.
        torch.default_generator.manual_seed(seed)

    zero = lambda *a, **k: 0  # noqa: E731
    nvtx = type(
        "nvtx",
        (),
        {
            "range_push": staticmethod(zero),
            "range_pop": staticmethod(zero),
            "range": staticmethod(lambda *a, **k: contextlib.nullcontext()),
            "mark": staticmethod(zero),
        },
    )
    return {
        "current_device": lambda: 0,
        "device_count": lambda: 1,
        "set_device": lambda *a, **k: None,
        "synchronize": lambda *a, **k: None,
        "empty_cache": lambda: None,
        "Stream": _Stream,
        "Event": _Event,
        "current_stream": lambda *a, **k: _Stream(),
        "default_stream": lambda *a, **k: _Stream(),
        "stream": lambda s=None: contextlib.nullcontext(s),
        "set_stream": lambda *a, **k: None,
        "nvtx": nvtx,
        "get_rng_state": get_rng_state,
        "set_rng_state": set_rng_state,
        "manual_seed": manual_seed,
        "default_generators": (torch.default_generator,),
        "memory_allocated": zero,
        "memory_reserved": zero,
        "max_memory_allocated": zero,
        "max_memory_reserved": zero,
        "reset_peak_memory_stats": lambda *a, **k: None,
        "memory_stats": lambda *a, **k: {},
    }


def _patch(target: Any, name: str, value: Any, saved: list) -> None:
    saved.append((target, name, getattr(target, name, _MISSING)))
    setattr(target, name, value)


_MISSING = object()


def _patch_megatron_rng(saved: list) -> None:
    """The RNG tracker queues CUDA RNG updates until CUDA initialises; on CPU, apply them now."""
    from megatron.core.tensor_parallel import random as mcore_random

    _patch(mcore_random, "_lazy_call", lambda callback: callback(), saved)
    _patch(mcore_random, "device_ctx_manager", lambda *a, **k: contextlib.nullcontext(), saved)


def _patch_dist_checkpointing(saved: list) -> None:
    """Give dist_checkpointing's file writer a results queue that needs no manager process.

    ``FileSystemWriterAsync`` always takes its results queue from ``ctx.Manager().Queue()`` with a
    *spawn* context, even for a synchronous save. Spawning the manager's server process re-imports
    the launching script as ``__mp_main__``; a training script (or a ``torchrun`` target) that sets
    up ``torch.distributed`` at import time, or without a ``__main__`` guard, then joins the process
    group again with the parent's RANK/MASTER_PORT and blocks in rendezvous forever, so ``save()``
    never returns. The writer runs either in the saving process (a synchronous save) or in a
    process forked from it (a background save); a ``FileQueue`` serves both, with no extra
    process. It is created at the first save, so processes that never save make no directory.
    """
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    holder: list[FileQueue] = []

    def results_queue() -> FileQueue:
        if not holder:
            holder.append(FileQueue())
        return holder[0]

    _patch(filesystem_async, "_get_write_results_queue", results_queue, saved)


def _patch_autograd_backward(saved: list) -> None:
    """Keep the device redirection active inside custom autograd backward passes.

    Python torch-function modes are thread-local state that the autograd engine does not carry into
    backward, and megatron-core's autograd Functions (tensor-parallel linear layers,
    sequence-parallel gathers) allocate with ``device=torch.cuda.current_device()`` there.
    Every Python ``backward`` goes through ``BackwardCFunction.apply``, so the mode is
    re-entered around it.
    """
    from torch.autograd.function import BackwardCFunction

    original = BackwardCFunction.apply

    def apply_on_cpu(self, *args):
        with _CpuDeviceMode():
            return original(self, *args)

    _patch(BackwardCFunction, "apply", apply_on_cpu, saved)


def install_cpu_compat() -> None:
    """Map megatron-core's CUDA calls to CPU for this process. Idempotent."""
    global _installed
    with _state_lock:
        if _installed is not None:
            return
        saved: list = []
        for name, value in _cuda_replacements().items():
            _patch(torch.cuda, name, value, saved)
        _patch(torch.cuda.random, "get_rng_state", torch.cuda.get_rng_state, saved)
        _patch(torch.cuda.random, "set_rng_state", torch.cuda.set_rng_state, saved)
        _patch_megatron_rng(saved)
        _patch_dist_checkpointing(saved)
        _patch_autograd_backward(saved)
        mode = _CpuDeviceMode()
        mode.__enter__()
        _installed = {"saved": saved, "mode": mode}


def uninstall_cpu_compat() -> None:
    """Undo ``install_cpu_compat`` (used by tests that check it is switchable)."""
    global _installed
    with _state_lock:
        if _installed is None:
            return
        _installed["mode"].__exit__(None, None, None)
        for target, name, value in reversed(_installed["saved"]):
            if value is _MISSING:
                delattr(target, name)
            else:
                setattr(target, name, value)
        _installed = None


def resolve_device(requested: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; explicit values are checked."""
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "parallel.device=cuda but no CUDA device is visible; use parallel.device=cpu or auto"
        )
    if requested not in ("cpu", "cuda"):
        raise ValueError(f"parallel.device must be auto, cpu or cuda, got {requested!r}")
    return requested


def activate_device(requested: str) -> str:
    """Resolve the device and install the CPU layer only when it is ``cpu``; returns the device."""
    device = resolve_device(requested)
    if device == "cpu":
        install_cpu_compat()
    return device


def run_with_cpu_compat(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call ``fn`` with the CPU layer installed, restoring the previous state afterwards."""
    was_installed = is_cpu_compat_installed()
    install_cpu_compat()
    try:
        return fn(*args, **kwargs)
    finally:
        if not was_installed:
            uninstall_cpu_compat()
