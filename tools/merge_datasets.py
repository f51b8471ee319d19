"""Concatenate indexed datasets (same dtype), in the order given, into one.

When every input has the stats file ``tools/preprocess_data.py`` wrote, they must agree on the
tokenizer's vocabulary size, end-of-document id and ``append_eod`` (else nothing is merged), and
the merged dataset gets one too, so that training checks it as it checks the inputs.

CPU example:

    python tools/merge_datasets.py \\
        --input data/tokens/a_text_document data/tokens/b_text_document \\
        --output-prefix data/tokens/ab_text_document
"""

from __future__ import annotations

import argparse
import sys

from megatron_ext.data.indexed_writer import merge_datasets
from megatron_ext.data.provenance import merged_stats, write_stats


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", nargs="+", required=True, help="dataset prefixes, in order")
    parser.add_argument("--output-prefix", required=True, help="prefix of the merged dataset")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        stats = merged_stats(args.input)
        index = merge_datasets(args.input, args.output_prefix)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if stats is None:
        print("note: not every input has preprocessing stats: the merged dataset has none")
    else:
        write_stats(args.output_prefix, {**stats, "outputs": {"merged": args.output_prefix}})
    print(
        f"{args.output_prefix}: {index.num_documents:,} documents, {index.num_tokens:,} tokens, "
        f"dtype {index.dtype.name}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
