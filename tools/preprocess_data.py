"""Tokenize JSONL into Megatron indexed datasets (``{prefix}_{key}_document.bin/.idx``).

A drop-in for Megatron-LM's ``tools/preprocess_data.py`` common flags, with bounded memory,
parallel writers and bad-input accounting. CPU example:

    python tools/preprocess_data.py --input "data/curated/*.jsonl.zst" \\
        --output-prefix data/tokens/web --tokenizer-type SentencePieceTokenizer \\
        --tokenizer-model out/tokenizer/tokenizer.model --append-eod --workers 2

Bad records are counted and reported with line numbers (``--strict`` stops at the first one).
Megatron-LM's ``--partitions``, ``--log-interval`` and ``--keep-sequential-samples`` are
accepted and have nothing to do here (parts are always written in parallel and merged in input
order); ``--split-sentences`` is refused: send one sentence per list item instead.
"""

from __future__ import annotations

import argparse
import logging
import sys

from megatron_ext.data.jsonl_io import BadInputError
from megatron_ext.data.preprocess import preprocess
from megatron_ext.tokenizer.loading import TOKENIZER_TYPES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--input", nargs="+", required=True, help="JSONL files or globs (plain, .gz, .zst)"
    )
    parser.add_argument("--output-prefix", required=True, help="output path prefix")
    parser.add_argument(
        "--json-keys",
        nargs="+",
        default=["text"],
        help="keys to tokenize, one dataset each (default: text)",
    )
    parser.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    parser.add_argument(
        "--tokenizer-model",
        required=True,
        help=".model file, tokenizer.json or a tokenizer directory",
    )
    parser.add_argument(
        "--append-eod", action="store_true", help="append the end-of-document id to every document"
    )
    parser.add_argument("--workers", type=int, default=1, help="tokenizing processes")
    parser.add_argument("--strict", action="store_true", help="stop at the first bad record")
    parser.add_argument(
        "--max-doc-bytes",
        type=int,
        default=None,
        help="skip records whose line is longer (reason too_large)",
    )
    parser.add_argument(
        "--chunk-bytes", type=int, default=1 << 20, help="input bytes per task (default 1 MiB)"
    )
    parser.add_argument(
        "--batch-docs", type=int, default=256, help="documents per tokenizer call (default 256)"
    )
    parser.add_argument(
        "--dtype",
        choices=["uint16", "int32"],
        default=None,
        help="id dtype (default: uint16 when the vocabulary has <= 65,536 ids)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    # Megatron-LM flags without a job here.
    parser.add_argument("--partitions", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--log-interval", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--keep-sequential-samples", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--split-sentences", action="store_true", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    if args.split_sentences:
        print(
            "error: --split-sentences is not supported (it needs NLTK's punkt data); "
            "give each document's sentences as a JSON list instead",
            file=sys.stderr,
        )
        return 2
    if args.workers < 1:
        print(f"error: --workers must be >= 1, got {args.workers}", file=sys.stderr)
        return 2
    try:
        result = preprocess(
            args.input,
            args.output_prefix,
            args.tokenizer_type,
            args.tokenizer_model,
            json_keys=args.json_keys,
            append_eod=args.append_eod,
            workers=args.workers,
            strict=args.strict,
            max_doc_bytes=args.max_doc_bytes,
            chunk_bytes=args.chunk_bytes,
            batch_docs=args.batch_docs,
            dtype=args.dtype,
            progress=not args.no_progress,
        )
    except (BadInputError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(result.summary())
    for key, prefix in result.output_prefixes.items():
        print(f"{key}: {prefix}.bin / .idx")
    return 0


if __name__ == "__main__":
    sys.exit(main())
