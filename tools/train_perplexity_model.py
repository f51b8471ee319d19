"""Train per-language modified Kneser-Ney n-gram models (ARPA) for perplexity filtering.

CPU example (models from the built-in corpus: train split for the models, held-out split for the
percentile reference):

    python tools/train_perplexity_model.py --builtin --output-dir demo/ppl_models --order 5

From your own reference corpus (JSONL records with a text field and a language field):

    python tools/train_perplexity_model.py --input 'wiki/*.jsonl.gz' --lang-key lang \\
        --languages en,fr --unit word --order 5 --output-dir models/ppl

Writes ``<lang>.arpa`` per language and ``manifest.json`` (percentiles of held-out perplexity);
point ``perplexity.model_dir`` of the curation config at the output directory.
"""

from __future__ import annotations

import argparse
import sys

from megatron_ext.data.jsonl_io import BadInputReport, expand_inputs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", nargs="+", default=[], help="reference JSONL files or globs")
    parser.add_argument(
        "--heldout-input",
        nargs="+",
        default=[],
        help="held-out JSONL for the percentiles (default: every Nth document)",
    )
    parser.add_argument(
        "--builtin",
        action="store_true",
        help="use the built-in corpus (train split; held-out split for percentiles)",
    )
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--text-key", default="text")
    parser.add_argument("--lang-key", default="lang", help="field naming each record's language")
    parser.add_argument("--languages", default="", help="comma-separated codes (default: all)")
    parser.add_argument("--order", type=int, default=5, help="n-gram order (>= 2)")
    parser.add_argument(
        "--unit",
        default="char",
        choices=["char", "word"],
        help="model characters (small reference corpora) or words",
    )
    parser.add_argument(
        "--heldout-every",
        type=int,
        default=10,
        help="hold out every Nth document when --heldout-input is not given",
    )
    parser.add_argument("--strict", action="store_true", help="fail on the first bad record")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from megatron_ext.curation.builtin_corpus import builtin_documents
    from megatron_ext.curation.perplexity import iter_language_documents, train_perplexity_models

    languages = [c for c in args.languages.split(",") if c] or None
    report = BadInputReport()
    try:
        if args.builtin:
            train = [(d["source_lang"], d["text"]) for d in builtin_documents(languages, "train")]
            heldout = [
                (d["source_lang"], d["text"]) for d in builtin_documents(languages, "heldout")
            ]
        else:
            if not args.input:
                raise ValueError("give --input (reference JSONL) or --builtin")
            keys = dict(
                text_key=args.text_key, lang_key=args.lang_key, report=report, strict=args.strict
            )
            train = iter_language_documents(expand_inputs(args.input), **keys)
            heldout = None
            if args.heldout_input:
                heldout = list(iter_language_documents(expand_inputs(args.heldout_input), **keys))
        manifest = train_perplexity_models(
            train,
            args.output_dir,
            order=args.order,
            unit=args.unit,
            heldout_docs=heldout,
            heldout_every=args.heldout_every,
            languages=languages,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for lang, entry in sorted(manifest["languages"].items()):
        median = entry["percentiles"][50]
        print(
            f"{lang}: {entry['train_docs']} docs, {entry['train_tokens']} tokens, "
            f"vocab {entry['vocab_size']}, median {entry['percentiles_from']} perplexity "
            f"{median:.1f} ({entry['percentile_docs']} docs) -> {entry['arpa']}"
        )
    print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
