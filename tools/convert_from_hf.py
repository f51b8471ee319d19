"""Import a Hugging Face Llama directory as a megatron_ext checkpoint to fine-tune from.

Writes RUN_DIR/checkpoints/iter_0000000/ (torch_dist, loadable at any TP/PP layout) with the
model section in config.yaml and the tokenizer in tokenizer/, and RUN_DIR/checkpoints/latest.

CPU example:

    python tools/convert_from_hf.py --hf-dir hf/my_llama --output runs/my_llama --target-tp 2
    # then train with --checkpoint.load=runs/my_llama/checkpoints --checkpoint.finetune=true
    # and the model section of runs/my_llama/checkpoints/iter_0000000/config.yaml
"""

from __future__ import annotations

import argparse
import logging
import sys

from megatron_ext.convert.from_hf import convert_from_hf
from megatron_ext.models.config import TORCH_DTYPES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--hf-dir", required=True, help="Hugging Face model directory (config.json)"
    )
    parser.add_argument(
        "--output", required=True, help="run directory to create, or an iter_NNNNNNN directory"
    )
    parser.add_argument(
        "--target-tp",
        type=int,
        default=1,
        help="tensor-parallel degree training will use (decides the vocabulary padding)",
    )
    parser.add_argument(
        "--make-vocab-size-divisible-by",
        type=int,
        default=None,
        help="vocabulary padding multiple (default: the largest <= 128 that needs no padding)",
    )
    parser.add_argument(
        "--seq-length",
        type=int,
        default=None,
        help="model.seq_length (default: max_position_embeddings)",
    )
    parser.add_argument(
        "--dtype", choices=list(TORCH_DTYPES), default="fp32", help="stored weight dtype"
    )
    parser.add_argument(
        "--tokenizer", default=None, help="tokenizer to carry over (default: the one in --hf-dir)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        checkpoint = convert_from_hf(
            args.hf_dir,
            args.output,
            tensor_model_parallel_size=args.target_tp,
            make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
            seq_length=args.seq_length,
            dtype=args.dtype,
            tokenizer_dir=args.tokenizer,
        )
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {checkpoint}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
