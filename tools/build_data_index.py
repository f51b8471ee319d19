"""Build the data index of an experiment ahead of training, into its ``data.index_cache_dir``.

The training processes then only memory-map the files: none of them spends the minutes (and the
memory) that splitting and shuffling a corpus of a billion documents takes. Run it once per
shared filesystem, or once per node for a node-local directory; later epochs are built during
training, in the background, by one process. CPU example:

    python tools/build_data_index.py --config examples/configs/tiny_cpu.yaml \\
        --data.index_cache_dir=runs/tiny_cpu/data_index

By default it builds every blended epoch the run will read (from ``schedule``: all steps, with
the curriculum) and the validation epochs its evaluations read; ``--epochs N`` builds the first
N training epochs instead.

``--prune`` then deletes every other entry of the directory (old datasets, seeds, weights,
splits; other experiments' entries, if they share the directory: those are built again when
read) and what killed builders left behind, and says how much it freed.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from megatron_ext.config.errors import ConfigError, ProblemCollector
from megatron_ext.config.loader import load_config
from megatron_ext.data.index_cache import IndexCache, prune, tree_bytes
from megatron_ext.data.token_stream import build_token_streams
from megatron_ext.training.experiment import ExperimentConfig
from megatron_ext.training.schedules import check_schedule, planned_tokens


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Any other argument --section.field=value overrides the config file.",
    )
    parser.add_argument("--config", required=True, help="experiment YAML file")
    parser.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="training epochs to build (default: as many as the run's schedule reads)",
    )
    parser.add_argument(
        "--data-parallel-size",
        type=int,
        default=1,
        help="the run's data-parallel size; only a token-based curriculum without "
        "schedule.curriculum.batch_multiple depends on it (default: 1)",
    )
    parser.add_argument(
        "--prune",
        action="store_true",
        help="afterwards, delete the directory's entries that this run does not read",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args, overrides = build_parser().parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.epochs is not None and args.epochs < 1:
            raise ValueError(f"--epochs must be >= 1, got {args.epochs}")
        cfg = load_config(ExperimentConfig, args.config, overrides)
        data = cfg.data
        problems = ProblemCollector()
        data.validate(problems)
        problems.raise_if_any()
        if data.index_cache_dir is None:
            raise ValueError("data.index_cache_dir is not set: there is nowhere to build to")
        start = time.perf_counter()
        cache = IndexCache(data.index_cache_dir)
        streams = build_token_streams(data, cache)
        epochs = args.epochs
        if epochs is None:
            check_schedule(cfg.schedule, args.data_parallel_size)
            last = planned_tokens(cfg.schedule, args.data_parallel_size) - 1
            epochs = streams.train.epoch_of(last) + 1
        streams.train.prepare_epochs(epochs)
        if streams.valid is not None and cfg.training.eval_iters > 0:
            schedule = cfg.schedule
            last = cfg.training.eval_iters * schedule.global_batch_size * schedule.seq_length
            streams.valid.prepare_epochs(streams.valid.epoch_of(last) + 1)
        pruned = prune(data.index_cache_dir, cache.used) if args.prune else None
    except (ConfigError, ValueError, OSError) as exc:
        print(f"build_data_index: {exc}", file=sys.stderr)
        return 1
    size = tree_bytes(data.index_cache_dir)
    print(
        f"{len(cache.built)} index entries built, {size / 2**20:.1f} MiB in "
        f"{data.index_cache_dir} ({time.perf_counter() - start:.1f} s); {epochs} training "
        f"epoch(s) of about {streams.train.tokens_per_epoch_nominal:,} tokens"
    )
    if pruned is not None:
        print(
            f"pruned {len(pruned.removed)} item(s) this run does not read, "
            f"{pruned.freed_bytes / 2**20:.1f} MiB freed"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
