"""Train a model: ``python -m megatron_ext.train --config FILE [--section.field=value ...]``.

Run it under torchrun for several processes (GPUs, or CPU processes over gloo)::

    torchrun --nproc-per-node 8 -m megatron_ext.train --config examples/configs/tiny_cpu.yaml \\
        --parallel.tensor_model_parallel_size=2 --parallel.pipeline_model_parallel_size=2

Validate a config for a world size without starting anything, and print the layout, parameters
per stage, gradient accumulation and a memory estimate per GPU::

    python -m megatron_ext.train --config examples/configs/recipe_7b.yaml --dry-run --world-size 64
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence

from megatron_ext.config.errors import ConfigError
from megatron_ext.config.loader import load_config


def _parse(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_ext.train",
        description="Train a Llama-style model with megatron-core (TP x PP x DP).",
        epilog="Any other argument --section.field=value overrides the config file.",
    )
    parser.add_argument("--config", required=True, help="experiment YAML file")
    parser.add_argument("--dry-run", action="store_true", help="validate and print the plan only")
    parser.add_argument(
        "--world-size", type=int, default=None, help="processes to plan for with --dry-run"
    )
    return parser.parse_known_args(argv)


def dry_run_report(cfg, world_size: int) -> str:
    """The validated plan of ``cfg`` on ``world_size`` processes, as readable text."""
    from megatron_ext.parallel.layout import ParallelLayout
    from megatron_ext.training.estimate import estimate_stages, total_params
    from megatron_ext.training.experiment import validate_experiment
    from megatron_ext.training.schedules import curriculum_lengths, step_global_batch_size

    validate_experiment(cfg, world_size, check_files=False)
    layout = ParallelLayout.from_config(cfg.parallel, world_size)
    sched = cfg.schedule
    tp = cfg.parallel.tensor_model_parallel_size
    lines = [
        f"layout: {layout.describe()}",
        f"model: {_count(total_params(cfg.model, tp))} parameters, "
        f"{cfg.model.num_layers} layers,"
        f" padded vocabulary {cfg.model.padded_vocab_size(tp)}",
    ]
    lengths = curriculum_lengths(sched)
    if len(lengths) > 1:
        lines.append(
            f"curriculum: {len(lengths)} sequence lengths from {lengths[0]} to {lengths[-1]}"
        )
    for length in sorted({lengths[0], lengths[-1]}):
        batch = step_global_batch_size(sched, length, layout.dp)
        accumulation = batch // (sched.micro_batch_size * layout.dp)
        lines.append(
            f"step at seq_length {length}: global batch {batch} sequences = micro batch "
            f"{sched.micro_batch_size} x DP {layout.dp} x {accumulation} micro-batches "
            "(gradient accumulation)"
        )
    estimates = estimate_stages(
        cfg.model, cfg.parallel, cfg.precision, world_size, sched.micro_batch_size, sched.seq_length
    )
    for est in estimates:
        lines.append(
            f"stage {est.stage}: {est.num_layers} layers, "
            f"{_count(est.params_per_gpu)} params/GPU;"
            f" memory/GPU ~{_size(est.total_gib)} (weights {_size(est.weights_gib)}, grads "
            f"{_size(est.grads_gib)}, optimizer {_size(est.optimizer_gib)}, activations "
            f"{_size(est.activations_gib)})"
        )
    return "\n".join(lines)


def _count(n: float) -> str:
    """A parameter count readable at any size: 1.024B, 35.3M, 81.9K."""
    for scale, unit, digits in ((1e9, "B", 3), (1e6, "M", 1), (1e3, "K", 1)):
        if n >= scale:
            return f"{n / scale:.{digits}f}{unit}"
    return f"{n:.0f}"


def _size(gib: float) -> str:
    """GiB with one decimal, or MiB below 0.1 GiB (a small model's figures)."""
    return f"{gib:.1f} GiB" if gib >= 0.1 else f"{gib * 1024:.1f} MiB"


def _report(exc: Exception) -> None:
    """Every rank sees the same config problem; rank 0 says it."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"error: {exc}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args, overrides = _parse(argv)
    from megatron_ext.training.experiment import ExperimentConfig

    try:
        cfg = load_config(ExperimentConfig, args.config, overrides)
        if args.dry_run:
            world_size = args.world_size or int(os.environ.get("WORLD_SIZE", "1"))
            print(dry_run_report(cfg, world_size))
            return 0
    except ConfigError as exc:
        _report(exc)
        layout_problem = any(field.startswith("parallel.") for field in exc.fields())
        if (
            args.dry_run
            and layout_problem
            and not args.world_size
            and "WORLD_SIZE" not in os.environ
        ):
            print(
                "note: the dry run planned for 1 process; pass --world-size N to plan for N",
                file=sys.stderr,
            )
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    # megatron-core logs its bucket and optimizer set-up at INFO on every rank.
    logging.getLogger("megatron").setLevel(logging.WARNING)
    from megatron_ext.checkpoint.directory import CheckpointError
    from megatron_ext.training.loop import train

    try:
        summary = train(cfg)
    except (ConfigError, CheckpointError) as exc:
        _report(exc)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"summary": summary.__dict__}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
