"""Curate JSONL text: cleaning, quality rules, language id, exact + near dedup, perplexity filter.

CPU example (built-in multilingual corpus, demo settings, two worker processes):

    python tools/curate_data.py --write-builtin-corpus demo/raw.jsonl
    python tools/curate_data.py --config examples/configs/curation_demo.yaml \\
        --input demo/raw.jsonl --output-dir demo/curated --workers 2

Inputs are files or globs (plain, .gz, .zst). Any ``--section.field=value`` argument overrides the
config (e.g. ``--langid.min_score=0.7``). Writes ``curated-*.jsonl[.gz|.zst]`` plus
``curation_report.json`` / ``curation_report.txt`` into the output directory. Exit status: 0 on
success, 2 for bad settings, missing inputs, or (with --strict) the first bad input record, 1 when
a worker process dies.
"""

from __future__ import annotations

import argparse
import sys

from megatron_ext.config.loader import load_config
from megatron_ext.curation.config import CurationConfig


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="YAML file with CurationConfig sections")
    parser.add_argument("--input", nargs="+", default=[], help="JSONL files or globs")
    parser.add_argument("--output-dir", help="directory for curated shards and the report")
    parser.add_argument("--workers", type=int, default=1, help="worker processes")
    parser.add_argument("--strict", action="store_true", help="fail on the first bad record")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--write-builtin-corpus",
        metavar="PATH",
        help="write the built-in multilingual corpus (JSONL) to PATH and exit",
    )
    parser.add_argument(
        "--split",
        default="train",
        choices=["train", "heldout"],
        help="split for --write-builtin-corpus",
    )
    parser.add_argument(
        "--languages",
        default="",
        help="comma-separated codes for --write-builtin-corpus (default: demo set)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, overrides = parser.parse_known_args(argv)
    unknown = [o for o in overrides if not (o.startswith("--") and "=" in o)]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        if args.write_builtin_corpus:
            from megatron_ext.curation.builtin_corpus import write_builtin_corpus

            languages = [c for c in args.languages.split(",") if c] or None
            count = write_builtin_corpus(args.write_builtin_corpus, languages, args.split)
            print(f"wrote {count} documents to {args.write_builtin_corpus}")
            return 0
        if not args.input or not args.output_dir:
            parser.error("--input and --output-dir are required")
        config = load_config(CurationConfig, args.config, overrides)
        if args.strict:
            config.io.strict = True
        from megatron_ext.curation.pipeline import run_curation

        report = run_curation(
            config, args.input, args.output_dir, args.workers, progress=not args.no_progress
        )
    except ValueError as exc:  # ConfigError and BadInputError are ValueErrors
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # a worker process died
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
