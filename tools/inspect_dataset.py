"""Print what an indexed dataset holds: counts, a length histogram and decoded documents.

CPU example:

    python tools/inspect_dataset.py data/tokens/web_text_document \\
        --tokenizer-type SentencePieceTokenizer --tokenizer-model out/tokenizer --num-samples 2
"""

from __future__ import annotations

import argparse
import sys

from megatron_ext.data.preprocess_inspect import dataset_summary, document_ids, format_summary
from megatron_ext.tokenizer.loading import TOKENIZER_TYPES, load_tokenizer


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("prefix", help="dataset prefix (without .bin/.idx)")
    parser.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES, default=None)
    parser.add_argument("--tokenizer-model", default=None, help="needed to decode samples")
    parser.add_argument("--num-samples", type=int, default=1, help="documents to decode")
    parser.add_argument("--max-chars", type=int, default=500, help="characters shown per sample")
    parser.add_argument("--bins", type=int, default=10, help="histogram bins")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = dataset_summary(args.prefix, args.bins)
        print(format_summary(summary))
        if args.tokenizer_model and args.num_samples > 0:
            tokenizer = load_tokenizer(
                args.tokenizer_type or "SentencePieceTokenizer", args.tokenizer_model
            )
            count = min(args.num_samples, summary["num_documents"])
            for doc in range(count):
                ids = document_ids(args.prefix, doc)
                text = tokenizer.detokenize(ids)
                shown = text[: args.max_chars] + ("..." if len(text) > args.max_chars else "")
                print(f"\n--- document {doc}: {ids.size} tokens, first ids {ids[:12].tolist()}")
                print(shown)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
