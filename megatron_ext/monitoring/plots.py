"""PNG dashboards of a run directory: scalars over steps and per-layer heatmaps over time.

``dashboard.png``: loss (train, and validation where logged) with skipped steps marked, gradient
norm, LR and sequence-length schedule, throughput and MFU (TFLOP/s per GPU when no MFU is known),
update-to-weight ratio and parameter norm, step-time breakdown. ``layers.png``: per-layer heatmaps
(layer x statistics step) of activation RMS and absolute max for attention output, MLP output and
residual stream, and of per-layer gradient norms, on a log colour scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_ext.monitoring.activations import SITES
from megatron_ext.monitoring.sinks import (
    LAYER_STATS_FILE,
    METRICS_FILE,
    latest_run_records,
    read_jsonl,
)


@dataclass
class PlotReport:
    """What ``plot_run`` wrote and what it had to skip."""

    written: list[Path] = field(default_factory=list)
    bad_lines: dict[str, list[int]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for record in records:
        value = record.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and "step" in record:
            steps.append(record["step"])
            values.append(float(value))
    return steps, values


def _finite(values: list[float]) -> bool:
    return any(math.isfinite(v) for v in values)


def _line(
    ax: Any, records: list[dict], key: str, label: str, log: bool = False, **style: Any
) -> bool:
    """Plot one series; ``log`` drops values <= 0 and sets a log y-axis."""
    steps, values = _series(records, key)
    if log:
        kept = [(s, v) for s, v in zip(steps, values) if v > 0]
        steps, values = [s for s, _ in kept], [v for _, v in kept]
    if not steps or not _finite(values):
        return False
    ax.plot(steps, values, label=label, **style)
    if log:
        ax.set_yscale("log")
    return True


def plot_dashboard(records: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(18, 9.5))
    fig.suptitle(title)
    ax = axes[0, 0]
    _line(ax, records, "loss", "train loss", lw=1)
    _line(ax, records, "val_loss", "validation loss", marker="o", lw=1.5)
    skipped = [r["step"] for r in records if r.get("skipped")]
    if skipped:
        for step in skipped:
            ax.axvline(step, color="red", alpha=0.3, lw=0.8)
        ax.plot([], [], color="red", alpha=0.5, label=f"skipped update ({len(skipped)})")
    ax.set_title("loss")
    ax.legend(loc="upper right")

    ax = axes[0, 1]
    _line(ax, records, "grad_norm", "global grad norm", log=True, lw=1)
    ax.set_title("gradient norm (before clipping)")

    ax = axes[0, 2]
    _line(ax, records, "lr", "learning rate", color="tab:blue")
    ax.set_ylabel("learning rate", color="tab:blue")
    twin = ax.twinx()
    _line(
        twin, records, "seq_length", "sequence length", color="tab:orange", drawstyle="steps-post"
    )
    twin.set_ylabel("sequence length", color="tab:orange")
    ax.set_title("schedules")

    ax = axes[1, 0]
    _line(ax, records, "tokens_per_s", "tokens/s", color="tab:green", lw=1)
    ax.set_ylabel("tokens/s (global)", color="tab:green")
    twin = ax.twinx()
    steps, values = _series(records, "mfu")
    if steps:
        twin.plot(steps, [100 * v for v in values], color="tab:purple", lw=1)
        twin.set_ylabel("MFU (%)", color="tab:purple")
    elif _line(twin, records, "tflops_per_gpu", "TFLOP/s per GPU", color="tab:purple", lw=1):
        twin.set_ylabel("model TFLOP/s per GPU", color="tab:purple")
    ax.set_title("throughput")

    ax = axes[1, 1]
    _line(ax, records, "update_to_weight", "update / weight", log=True, marker=".", color="tab:red")
    ax.set_ylabel("||dW|| / ||W||", color="tab:red")
    twin = ax.twinx()
    _line(twin, records, "param_norm", "parameter norm", color="tab:gray", lw=1)
    twin.set_ylabel("parameter norm", color="tab:gray")
    ax.set_title("update-to-weight ratio and parameter norm")

    ax = axes[1, 2]
    timing_keys = sorted({k for r in records for k in r if k.endswith("_ms")})
    for key in timing_keys:
        _line(ax, records, key, key[: -len("_ms")], lw=1)
    if timing_keys:
        ax.legend(loc="upper right", fontsize="small")
    ax.set_ylabel("ms")
    ax.set_title("step time breakdown")
    for ax in axes.flat:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _layer_matrix(layer_records: list[dict], site: str | None, stat: str) -> list[list[float]]:
    """[layer][record] values (NaN where missing)."""
    num_layers = max(len(r.get("layers", [])) for r in layer_records)
    matrix = [[math.nan] * len(layer_records) for _ in range(num_layers)]
    for column, record in enumerate(layer_records):
        for entry in record.get("layers", []):
            source = entry if site is None else entry.get(site, {})
            value = source.get(stat)
            if isinstance(value, (int, float)):
                matrix[entry["layer"]][column] = float(value)
    return matrix


def plot_layers(layer_records: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import LogNorm

    steps = [r["step"] for r in layer_records]
    panels = [(site, stat) for stat in ("rms", "abs_max") for site in SITES]
    panels += [
        (None, "grad_norm"),
        ("residual", "frac_near_e4m3_max"),
        ("mlp", "frac_near_e4m3_max"),
    ]
    fig, axes = plt.subplots(3, 3, figsize=(18, 12))
    fig.suptitle(f"{title}: per-layer statistics (layer x step)")
    for ax, (site, stat) in zip(axes.flat, panels):
        matrix = np.array(_layer_matrix(layer_records, site, stat), dtype=float)
        positive = matrix[np.isfinite(matrix) & (matrix > 0)]
        name = f"{site} {stat}" if site else "gradient norm"
        if positive.size == 0:
            ax.set_title(f"{name}: {'all zero' if np.isfinite(matrix).any() else 'no data'}")
            ax.axis("off")
            continue
        norm = LogNorm(vmin=positive.min(), vmax=max(positive.max(), positive.min() * 1.0001))
        image = ax.imshow(
            np.where(matrix > 0, matrix, np.nan),
            aspect="auto",
            origin="lower",
            norm=norm,
            cmap="viridis",
            interpolation="nearest",
        )
        ticks = np.linspace(0, len(steps) - 1, min(len(steps), 8)).round().astype(int)
        ax.set_xticks(ticks, [str(steps[i]) for i in ticks])
        ax.set_xlabel("step")
        ax.set_yticks(np.linspace(0, matrix.shape[0] - 1, min(matrix.shape[0], 16)).round())
        ax.set_ylabel("layer")
        ax.set_title(name)
        fig.colorbar(image, ax=ax)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> PlotReport:
    """Write dashboard.png (and layers.png when per-layer statistics exist) for a run directory."""
    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir / "plots"
    metrics_path = run_dir / METRICS_FILE
    if not metrics_path.is_file():
        raise FileNotFoundError(f"{metrics_path} does not exist: is {run_dir} a run directory?")
    out.mkdir(parents=True, exist_ok=True)
    report = PlotReport()
    records, bad = read_jsonl(metrics_path)
    if bad:
        report.bad_lines[METRICS_FILE] = bad
    # A resumed run appends the steps after its checkpoint again: plot each step once.
    records = latest_run_records([r for r in records if isinstance(r.get("step"), int)])
    if not records:
        raise ValueError(f"{metrics_path} holds no step records")
    plot_dashboard(records, out / "dashboard.png", run_dir.resolve().name)
    report.written.append(out / "dashboard.png")
    layers_path = run_dir / LAYER_STATS_FILE
    layer_records: list[dict] = []
    if layers_path.is_file():
        layer_records, bad = read_jsonl(layers_path)
        if bad:
            report.bad_lines[LAYER_STATS_FILE] = bad
        layer_records = latest_run_records(
            [r for r in layer_records if r.get("layers") and isinstance(r.get("step"), int)]
        )
    if layer_records:
        plot_layers(layer_records, out / "layers.png", run_dir.resolve().name)
        report.written.append(out / "layers.png")
    else:
        report.notes.append(
            "no per-layer statistics (monitoring.activation_stats_interval is 0, or the run "
            "ended before its first interval)"
        )
    return report
