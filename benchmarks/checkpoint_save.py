"""Training time lost to a checkpoint save: synchronous against ``checkpoint.async_save``, same run.

One process (world size 1) trains one model and saves it, round by round, once synchronously and
once in the background (into separate directories keeping one checkpoint each). Measured per save:

  blocked        how long ``save_checkpoint`` kept the training loop waiting
  slower steps   the extra time of the steps that ran while the background writers wrote
                 (against the median step without a save in flight: the writers share the
                 machine's cores, memory bandwidth and disk with training)
  lost           blocked + slower steps: the training time the save cost
  published      from the start of a background save until its checkpoint was published

Printed: each figure per mode (mean over rounds), ``lost`` of the background save as a ratio of
the synchronous save's, and the checkpoint's size. CPU example (about 2 minutes on 2 cores, a
checkpoint of ~2.7 GB):

    python benchmarks/checkpoint_save.py

GPU example (0.6B parameters, bf16, ~10 GB per checkpoint):

    python benchmarks/checkpoint_save.py --device cuda --dtype bf16 --hidden-size 2048 \\
        --num-layers 10 --seq-length 2048 --micro-batch-size 4
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

VOCAB = 32000


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser, hidden_size=1024, num_layers=8, micro_batch_size=2)
    parser.add_argument("--rounds", type=int, default=3, help="saves per mode")
    parser.add_argument("--baseline-steps", type=int, default=3, help="steps without a save")
    parser.add_argument(
        "--max-steps-in-flight",
        type=int,
        default=50,
        help="steps to train while a background save writes before waiting for it",
    )
    parser.add_argument("--dir", default=None, help="where to save (default: a temp directory)")
    return parser


class _Trainer:
    """A model, DDP, distributed optimizer and LR scheduler on a process group of one."""

    def __init__(self, args: argparse.Namespace):
        from megatron.core import parallel_state

        from megatron_ext.models.config import PrecisionConfig
        from megatron_ext.parallel.config import ParallelConfig
        from megatron_ext.parallel.init import initialize_parallel
        from megatron_ext.training.optimizer import OptimizerConfig
        from megatron_ext.training.schedule_config import ScheduleConfig
        from megatron_ext.training.trainable import build_trainable

        parallel = ParallelConfig(device=args.device)
        self.ctx = initialize_parallel(parallel, seed=1)
        model_cfg = model_config(args, VOCAB)
        trainable = build_trainable(
            model_cfg,
            parallel,
            PrecisionConfig(dtype=args.dtype),
            OptimizerConfig(),
            ScheduleConfig(lr=1e-4, lr_warmup_steps=10, train_steps=100_000),
            self.ctx.device,
        )
        self.model, self.optimizer = trainable.model, trainable.optimizer
        self.scheduler = trainable.scheduler
        self.is_last = parallel_state.is_pipeline_last_stage()
        self.parameters = sum(p.numel() for p in self.model[0].parameters())
        self.args = args
        self.gen = torch.Generator().manual_seed(0)
        self.step_count = 0

    def sync(self) -> None:
        if self.ctx.device == "cuda":
            torch.cuda.synchronize()

    def step(self) -> float:
        from megatron_ext.training.step import train_step

        a = self.args
        tokens = torch.randint(
            0, VOCAB, (2 * a.micro_batch_size, a.seq_length + 1), generator=self.gen
        )
        batches = split_micro_batches(tokens, a.micro_batch_size)
        self.sync()
        start = time.perf_counter()
        train_step(
            self.model,
            self.optimizer,
            batches,
            a.seq_length,
            self.ctx.torch_device,
            self.ctx.pp_group(),
            self.is_last,
        )
        self.scheduler.step(increment=1)
        self.sync()
        self.step_count += 1
        return time.perf_counter() - start

    def save(self, cfg, background) -> float:
        from megatron_ext.checkpoint.manager import save_checkpoint

        self.sync()
        start = time.perf_counter()
        save_checkpoint(
            cfg,
            Path(cfg.save_dir).parent,
            self.step_count,
            self.model,
            self.optimizer,
            self.scheduler,
            {"consumed_tokens": 0},
            {"seed": 1},
            self.ctx,
            background,
        )
        self.sync()
        return time.perf_counter() - start


def _round(trainer: _Trainer, sync_cfg, async_cfg, background, args) -> dict[str, float]:
    baseline = statistics.median(trainer.step() for _ in range(args.baseline_steps))
    sync_blocked = trainer.save(sync_cfg, None)
    sync_slower = sum(max(0.0, trainer.step() - baseline) for _ in range(2))
    began = time.perf_counter()
    async_blocked = trainer.save(async_cfg, background)
    async_slower, steps = 0.0, 0
    while background.in_flight and steps < args.max_steps_in_flight:
        async_slower += max(0.0, trainer.step() - baseline)
        steps += 1
        background.finalize_finished()
    waited = time.perf_counter()
    background.wait()
    async_blocked += time.perf_counter() - waited
    return {
        "baseline_step": baseline,
        "sync_blocked": sync_blocked,
        "sync_slower": sync_slower,
        "async_blocked": async_blocked,
        "async_slower": async_slower,
        "async_published": time.perf_counter() - began,
        "async_steps_in_flight": steps,
    }


def _size_gb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e9


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from megatron_ext.checkpoint.background import BackgroundSaves
    from megatron_ext.checkpoint.config import CheckpointConfig
    from megatron_ext.parallel.init import destroy_parallel

    trainer = _Trainer(args)
    background = BackgroundSaves()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        sync_cfg = CheckpointConfig(save_dir=str(Path(tmp) / "sync"), keep_last=1)
        async_cfg = CheckpointConfig(
            save_dir=str(Path(tmp) / "async"), async_save=True, keep_last=1
        )
        trainer.step()  # warm-up
        rounds = [
            _round(trainer, sync_cfg, async_cfg, background, args) for _ in range(args.rounds)
        ]
        size = _size_gb(Path(tmp) / "sync")
    destroy_parallel()
    mean = {key: statistics.fmean(r[key] for r in rounds) for key in rounds[0]}
    sync_lost = mean["sync_blocked"] + mean["sync_slower"]
    async_lost = mean["async_blocked"] + mean["async_slower"]
    print(
        f"device={trainer.ctx.device} dtype={args.dtype} "
        f"parameters={trainer.parameters / 1e6:.0f}M checkpoint={size:.2f} GB; "
        f"{args.rounds} saves per mode; baseline step "
        f"{mean['baseline_step'] * 1000:.0f} ms"
    )
    print(
        f"{'mode':<12} {'blocked s':>10} {'slower steps s':>15} {'lost s':>8} {'published s':>12}"
    )
    print(
        f"{'synchronous':<12} {mean['sync_blocked']:>10.2f} {mean['sync_slower']:>15.2f} "
        f"{sync_lost:>8.2f} {mean['sync_blocked']:>12.2f}"
    )
    print(
        f"{'background':<12} {mean['async_blocked']:>10.2f} {mean['async_slower']:>15.2f} "
        f"{async_lost:>8.2f} {mean['async_published']:>12.2f}"
    )
    print(
        f"background save: training lost {async_lost / sync_lost:.2f}x the synchronous save's time "
        f"({sync_lost / max(async_lost, 1e-9):.1f}x less); blocked "
        f"{mean['async_blocked'] / mean['sync_blocked']:.2f}x; published after "
        f"{mean['async_steps_in_flight']:.1f} steps on average"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
