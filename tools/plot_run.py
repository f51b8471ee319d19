"""PNG dashboards of a run: loss, grad norm, schedules, throughput/MFU, per-layer heatmaps.

Reads <RUN_DIR>/metrics.jsonl and <RUN_DIR>/activation_stats.jsonl and writes dashboard.png and
layers.png into <RUN_DIR>/plots (or --out). CPU example, after the tiny CPU training run:

    python tools/plot_run.py runs/tiny_cpu
"""

from __future__ import annotations

import argparse
import sys

from megatron_ext.monitoring.plots import plot_run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="run directory holding metrics.jsonl")
    parser.add_argument("--out", default=None, help="output directory (default: RUN_DIR/plots)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        report = plot_run(args.run_dir, args.out)
    except (FileNotFoundError, ValueError) as error:
        print(f"plot_run: {error}", file=sys.stderr)
        return 2
    for name, lines in report.bad_lines.items():
        shown = ", ".join(map(str, lines[:10])) + (" ..." if len(lines) > 10 else "")
        print(f"skipped {len(lines)} malformed line(s) of {name}: {shown}", file=sys.stderr)
    for note in report.notes:
        print(note)
    for path in report.written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
