"""Step-time overhead of monitoring: per-layer statistics at interval 1 and 100 against none.

One process (world size 1) trains the same model with four set-ups, interleaved round by round so
that drift in machine load hits all of them alike:

  none        train_step without any monitor (the baseline)
  stats_off   TrainingMonitor with activation_stats_interval=0 (scalars, param norm, metrics.jsonl)
  every_100   activation_stats_interval=100
  every_1     activation_stats_interval=1

The set-ups take turns step by step; each numbers its own steps, so every_100 computes statistics
on one step in 100. Printed: mean step time per set-up and its ratio to ``none`` (and to
``stats_off``); a robust ratio (the median of a set-up's ordinary steps, plus its statistics steps
in full), which shared machines need; and the median extra cost of a statistics step from paired
steps. Target: every_100 within 1% of none.

CPU example (about seven minutes on 2 busy cores):

    python benchmarks/monitoring_overhead.py --steps 200

GPU example (a 0.4B-parameter shape):

    python benchmarks/monitoring_overhead.py --device cuda --dtype bf16 --hidden-size 1024 \\
        --num-layers 24 --seq-length 2048 --micro-batch-size 4 --steps 300
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from small_model import add_model_arguments, model_config

from megatron_ext.data.batches import split_micro_batches

SETUPS = {"none": None, "stats_off": 0, "every_100": 100, "every_1": 1}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser, hidden_size=128, num_layers=4, micro_batch_size=4)
    parser.add_argument("--num-microbatches", type=int, default=2)
    parser.add_argument(
        "--compile-layers",
        default="auto",
        choices=["auto", "on", "off"],
        help="model.compile_layers (auto: torch.compile per layer on CUDA)",
    )
    parser.add_argument("--steps", type=int, default=200, help="steps per set-up")
    parser.add_argument("--warmup", type=int, default=5)
    return parser


class _Trainer:
    def __init__(self, args: argparse.Namespace):
        from megatron.core import parallel_state

        from megatron_ext.models.builder import build_model
        from megatron_ext.models.config import PrecisionConfig
        from megatron_ext.parallel.config import ParallelConfig
        from megatron_ext.parallel.init import initialize_parallel
        from megatron_ext.training.optimizer import OptimizerConfig, prepare_for_training

        self.parallel = ParallelConfig(device=args.device)
        self.ctx = initialize_parallel(self.parallel, seed=1)
        self.model_cfg = model_config(args, 8192, compile_layers=args.compile_layers)
        precision = PrecisionConfig(dtype=args.dtype)
        chunks = build_model(self.model_cfg, self.parallel, precision, self.ctx.device)
        self.ddp, self.optimizer = prepare_for_training(
            chunks, self.parallel, precision, OptimizerConfig(), 1e-4, 1e-5
        )
        self.is_last = parallel_state.is_pipeline_last_stage()
        self.args = args
        self.gen = torch.Generator().manual_seed(0)

    def batches(self) -> list[dict[str, torch.Tensor]]:
        a = self.args
        tokens = torch.randint(
            0, 8192, (a.num_microbatches * a.micro_batch_size, a.seq_length + 1), generator=self.gen
        )
        return split_micro_batches(tokens, a.micro_batch_size)

    def sync(self) -> None:
        if self.ctx.device == "cuda":
            torch.cuda.synchronize()

    def step(self, monitor, step: int) -> tuple[float, dict]:
        from megatron_ext.training.step import train_step

        batches = self.batches()
        self.sync()
        start = time.perf_counter()
        gate = None
        if monitor is not None:
            monitor.start_step(step)
            gate = monitor.update_gate(step)
        result = train_step(
            self.ddp,
            self.optimizer,
            batches,
            self.args.seq_length,
            self.ctx.torch_device,
            self.ctx.pp_group(),
            self.is_last,
            allow_update=gate,
        )
        record: dict = {}
        if monitor is not None:
            self.sync()
            elapsed = time.perf_counter() - start
            scalars = {
                "loss": result.loss,
                "grad_norm": result.grad_norm,
                "seq_length": self.args.seq_length,
                "global_batch_size": len(batches) * self.args.micro_batch_size,
            }
            record = monitor.end_step(step, scalars, {"step_time": elapsed})
        self.sync()
        return time.perf_counter() - start, record


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from megatron_ext.monitoring import MonitoringConfig, TrainingMonitor
    from megatron_ext.parallel.init import destroy_parallel

    trainer = _Trainer(args)
    with tempfile.TemporaryDirectory() as tmp:
        monitors = {
            name: None
            if interval is None
            else TrainingMonitor(
                MonitoringConfig(activation_stats_interval=interval, tensorboard=False),
                Path(tmp) / name,
                trainer.ctx,
                trainer.ddp,
                trainer.model_cfg,
            )
            for name, interval in SETUPS.items()
        }
        for step in range(1, args.warmup + 1):
            trainer.step(None, step)
        times: dict[str, list[float]] = {name: [] for name in SETUPS}
        last: dict = {}
        names = list(SETUPS)
        for index in range(args.steps):
            # Round-robin step by step (rotating the order), so load drift hits all alike.
            shift = index % len(names)
            for name in names[shift:] + names[:shift]:
                elapsed, record = trainer.step(monitors[name], len(times[name]) + 1)
                times[name].append(elapsed)
                if name == "stats_off":
                    last = record
        for monitor in monitors.values():
            if monitor is not None:
                monitor.close()
    mean = {name: statistics.fmean(values) for name, values in times.items()}
    print(
        f"device={trainer.ctx.device} dtype={args.dtype} hidden={args.hidden_size} "
        f"layers={args.num_layers} seq={args.seq_length} micro_batch={args.micro_batch_size} "
        f"x {args.num_microbatches} compile_layers={args.compile_layers}; {args.steps} steps per "
        "set-up, interleaved"
    )
    # Robust to load spikes from other processes: the median of a set-up's ordinary steps stands
    # for them, while its statistics steps are counted in full.
    robust = {}
    for name, interval in SETUPS.items():
        values = times[name]
        is_stats = [bool(interval) and (i + 1) % interval == 0 for i in range(len(values))]
        ordinary = [v for v, flag in zip(values, is_stats) if not flag]
        stats_total = sum(v for v, flag in zip(values, is_stats) if flag)
        typical = statistics.median(ordinary) if ordinary else 0.0
        robust[name] = (typical * len(ordinary) + stats_total) / len(values)
    print(
        f"{'set-up':<10} {'ms/step':>10} {'vs none':>9} {'vs stats_off':>13} {'robust vs none':>15}"
        f" {'robust vs stats_off':>20}"
    )
    for name in SETUPS:
        print(
            f"{name:<10} {1000 * mean[name]:>10.2f} {mean[name] / mean['none']:>9.4f} "
            f"{mean[name] / mean['stats_off']:>13.4f} {robust[name] / robust['none']:>15.4f}"
            f" {robust[name] / robust['stats_off']:>20.4f}"
        )
    throughput = [
        f"{key}={last[key]:.4g}" for key in ("tokens_per_s", "tflops_per_gpu", "mfu") if key in last
    ]
    print("last stats_off step: " + " ".join(throughput))
    # Paired per-step differences are robust to load drift; the median ignores outliers.
    extra = statistics.median(a - b for a, b in zip(times["every_1"], times["stats_off"]))
    base = statistics.median(times["stats_off"])
    print(
        f"median extra cost of a statistics step: {1000 * extra:.2f} ms "
        f"({extra / base:.2%} of a median step); at interval 100 that is "
        f"{extra / 100 / base:.4%} of a step"
    )
    destroy_parallel()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
