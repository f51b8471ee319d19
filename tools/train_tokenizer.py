"""Train the multilingual SentencePiece BPE tokenizer (and its Hugging Face files) on JSONL.

CPU example (a small vocabulary for a small corpus):

    python tools/train_tokenizer.py --input "data/curated/*.jsonl" --output-dir out/tokenizer \\
        --vocab-size 4000

Any field of ``TokenizerTrainingConfig`` can be set with ``--config file.yaml`` and/or
``--set field=value`` (e.g. ``--set temperature_alpha=0.5``). Writes tokenizer.model/.vocab,
tokenizer.json, tokenizer_config.json, special_tokens_map.json and tokenizer_report.{json,md}.
"""

from __future__ import annotations

import argparse
import logging
import sys

from megatron_ext.config.errors import ConfigError
from megatron_ext.config.loader import load_config
from megatron_ext.data.jsonl_io import BadInputError
from megatron_ext.tokenizer.training import TokenizerTrainingConfig, train_tokenizer


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--input", nargs="+", required=True, help="JSONL files or globs (plain, .gz, .zst)"
    )
    parser.add_argument("--output-dir", required=True)
    parser.add_argument(
        "--heldout",
        nargs="+",
        default=None,
        help="held-out JSONL for the report (default: a hashed share of input)",
    )
    parser.add_argument(
        "--vocab-size", type=int, default=None, help="vocabulary size (default 65536)"
    )
    parser.add_argument(
        "--temperature-alpha",
        type=float,
        default=None,
        help="language sampling exponent (default 0.3; 1 = natural mix)",
    )
    parser.add_argument("--config", default=None, help="YAML with TokenizerTrainingConfig fields")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override one config field (repeatable)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    overrides = list(args.set)
    if args.vocab_size is not None:
        overrides.append(f"vocab_size={args.vocab_size}")
    if args.temperature_alpha is not None:
        overrides.append(f"temperature_alpha={args.temperature_alpha}")
    try:
        config = load_config(TokenizerTrainingConfig, args.config, overrides)
        result = train_tokenizer(args.input, args.output_dir, config, heldout_inputs=args.heldout)
    except (ConfigError, BadInputError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"SentencePiece model: {result.model_path}")
    print(f"Hugging Face files: {', '.join(result.hf_files)}")
    print(f"report: {result.output_dir}/tokenizer_report.md")
    print(f"bad input skipped: {result.report['bad_input']['total']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
