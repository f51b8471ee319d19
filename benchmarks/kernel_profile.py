"""Where a training step's GPU time goes: kernel times of a few steps, grouped by kind.

``profile_steps`` runs a step function under ``torch.profiler`` and returns, per step, the total
kernel time, the time per category (communication, attention, optimizer, GEMM, Inductor/Triton
fused kernels, copies, other elementwise and reduction kernels) and the most expensive kernels,
and where the device sat idle between kernels (``idle_gaps``: the gaps in the union of the kernels'
time ranges, grouped by the kernels on either side, so a host that falls behind shows at the point
in the step where it does). On a CPU it records the operators' self time and the gaps between
operators instead, which is enough to exercise the code path.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import torch

# Category -> lower-case name fragments, tried in this order (the first match wins).
CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("communication", ("nccl", "allreduce", "allgather", "reducescatter", "all_reduce")),
    ("attention", ("flash", "fmha", "attention", "attn", "sdpa", "cudnn_generated")),
    ("optimizer", ("adam", "multi_tensor", "optim")),
    ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "sm90_", "matmul", "::mm", "::bmm", "addmm")),
    ("triton", ("triton",)),
    ("copy", ("memcpy", "memset", "copy", "cat_", "fill")),
    ("elementwise/reduction", ("elementwise", "reduce", "vectorized", "softmax", "norm")),
)


def categorise(kernel_name: str) -> str:
    """The category of a kernel (or, on a CPU, an operator) by its name; ``other`` if none."""
    name = kernel_name.lower()
    for category, fragments in CATEGORIES:
        if any(fragment in name for fragment in fragments):
            return category
    return "other"


def summarise(times_us: dict[str, float], steps: int, top: int = 40) -> dict:
    """Per-step milliseconds: total, by category (largest first), and the ``top`` kernels."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    by_category: dict[str, float] = defaultdict(float)
    for name, us in times_us.items():
        by_category[categorise(name)] += us
    per_step = lambda us: round(us / steps / 1e3, 3)  # noqa: E731
    ranked = sorted(times_us.items(), key=lambda item: item[1], reverse=True)
    return {
        "steps": steps,
        "total_ms": per_step(sum(times_us.values())),
        "categories_ms": {
            category: per_step(us)
            for category, us in sorted(by_category.items(), key=lambda item: -item[1])
        },
        "top_kernels_ms": [[name[:200], per_step(us)] for name, us in ranked[:top]],
    }


def short_name(kernel_name: str, chars: int = 80) -> str:
    """A kernel's name without ``void``, the ``at::native`` and anonymous namespaces, cut to
    ``chars``: long enough that kernels of one template with other functors stay apart."""
    name = kernel_name.removeprefix("void ")
    for noise in ("at::native::", "(anonymous namespace)::"):
        name = name.replace(noise, "")
    return name[:chars]


def idle_gaps(intervals: list[tuple[float, float, str]], steps: int, top: int = 8) -> dict:
    """Idle time between ``(start_us, end_us, name)`` intervals (kernels; several streams may
    overlap), per step: the span from the first start to the last end, the time no interval
    covers, and the ``top`` groups of gaps by (the interval that ended last before the gap, the
    one that starts after it), each with its count and milliseconds per step."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not intervals:
        return {"span_ms": 0.0, "idle_ms": 0.0, "gaps": []}
    ordered = sorted(intervals, key=lambda item: (item[0], item[1]))
    busy_until, last_name = ordered[0][1], ordered[0][2]
    groups: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0, 0.0])
    for start, end, name in ordered[1:]:
        if start > busy_until:
            group = groups[(short_name(last_name), short_name(name))]
            group[0] += 1
            group[1] += start - busy_until
        if end >= busy_until:
            busy_until, last_name = end, name
    idle_us = sum(us for _, us in groups.values())
    ranked = sorted(groups.items(), key=lambda item: item[1][1], reverse=True)
    return {
        "span_ms": round((busy_until - ordered[0][0]) / steps / 1e3, 3),
        "idle_ms": round(idle_us / steps / 1e3, 3),
        "gaps": [
            [before, after, round(count / steps, 1), round(us / steps / 1e3, 3)]
            for (before, after), (count, us) in ranked[:top]
        ],
    }


def profile_steps(step: Callable[[int], float], first_index: int, steps: int, device: str) -> dict:
    """Run ``step(first_index + i)`` for ``steps`` steps under the profiler; ``summarise`` them
    and add their ``idle_gaps`` (``idle``)."""
    from torch.profiler import ProfilerActivity, profile

    on_gpu = device == "cuda"
    activity = ProfilerActivity.CUDA if on_gpu else ProfilerActivity.CPU
    with profile(activities=[activity]) as prof:
        for i in range(steps):
            step(first_index + i)
        if on_gpu:
            torch.cuda.synchronize()
    times: dict[str, float] = defaultdict(float)
    intervals: list[tuple[float, float, str]] = []
    for event in prof.events():
        if on_gpu:
            if event.device_type != torch.autograd.DeviceType.CUDA:
                continue
            times[event.name] += _device_time_us(event)
        else:
            times[event.name] += event.self_cpu_time_total
        intervals.append((event.time_range.start, event.time_range.end, event.name))
    return {**summarise(dict(times), steps), "idle": idle_gaps(intervals, steps)}


def _device_time_us(event) -> float:
    for attribute in ("device_time", "cuda_time"):  # renamed in torch 2.4
        value = getattr(event, attribute, None)
        if value is not None:
            return float(value)
    return float(event.time_range.elapsed_us())


def markdown_lines(records: list[dict], top: int = 12) -> list[str]:
    """A table of each profiled run's categories, then the top kernels of the megatron_ext runs."""
    profiled = [r for r in records if "profile" in r]
    if not profiled:
        return []
    categories = list(dict.fromkeys(c for r in profiled for c in r["profile"]["categories_ms"]))
    lines = [
        "",
        "Kernel time per step (ms; torch.profiler over "
        f"{profiled[0]['profile']['steps']} steps after the timed ones; on a CPU, operator self "
        "time):",
        "",
        "| variant | shape | step (timed) | kernels | " + " | ".join(categories) + " |",
        "|---|---|---:|---:|" + "---:|" * len(categories),
    ]
    for r in profiled:
        p = r["profile"]
        cells = [f"{p['categories_ms'].get(c, 0.0):.1f}" for c in categories]
        step_ms = f"{1e3 * r['step_s_mean']:.1f}" if "step_s_mean" in r else ""
        lines.append(
            f"| {r['variant']} | {r['shape']} | {step_ms} | {p['total_ms']:.1f} | "
            + " | ".join(cells)
            + " |"
        )
    for r in profiled:
        if not r["variant"].startswith("megatron_ext"):
            continue
        lines += ["", f"Top kernels of {r['variant']} at {r['shape']} (ms per step):", ""]
        lines += [
            f"- {ms:.2f} [{categorise(name)}] `{name}`"
            for name, ms in r["profile"]["top_kernels_ms"][:top]
        ]
    lines += _idle_lines(profiled)
    return lines


def _idle_lines(profiled: list[dict], top: int = 5) -> list[str]:
    """Per profiled run: its idle time between kernels and where the largest gaps fall."""
    with_idle = [r for r in profiled if r["profile"].get("idle", {}).get("span_ms")]
    if not with_idle:
        return []
    lines = [
        "",
        "Idle time between kernels (ms per step, over the profiled steps' span; the largest "
        "groups of gaps as kernel before -> kernel after, gaps per step, ms per step):",
    ]
    for r in with_idle:
        idle = r["profile"]["idle"]
        lines += [
            "",
            f"- {r['variant']} at {r['shape']}: {idle['idle_ms']:.1f} idle of "
            f"{idle['span_ms']:.1f}",
        ]
        lines += [
            f"  - {ms:.2f} in {count:g} gaps: `{before}` -> `{after}`"
            for before, after, count, ms in idle["gaps"][:top]
        ]
    return lines
