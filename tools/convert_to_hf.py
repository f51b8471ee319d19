"""Export a megatron_ext checkpoint as a Hugging Face LlamaForCausalLM directory.

Reads the torch_dist checkpoint tensor by tensor on CPU, whatever TP/PP layout wrote it; writes
config.json, generation_config.json, safetensors shards with an index and the tokenizer files.

CPU example:

    python tools/convert_to_hf.py --checkpoint runs/tiny_cpu --output out/hf_tiny --dtype bf16
    python -c "from transformers import AutoModelForCausalLM as M; M.from_pretrained('out/hf_tiny')"
"""

from __future__ import annotations

import argparse
import logging
import sys

from megatron_ext.convert.to_hf import convert_to_hf
from megatron_ext.models.config import TORCH_DTYPES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="run directory (uses checkpoints/latest), its checkpoints/ directory, or iter_NNNNNNN",
    )
    parser.add_argument("--output", required=True, help="directory to write the HF model into")
    parser.add_argument(
        "--iteration", type=int, default=None, help="step to export (default: latest)"
    )
    parser.add_argument(
        "--dtype", choices=list(TORCH_DTYPES), default="fp32", help="weight dtype written"
    )
    parser.add_argument(
        "--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB or 500MB"
    )
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer directory or SentencePiece .model (default: the one the run names)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        output = convert_to_hf(
            args.checkpoint,
            args.output,
            iteration=args.iteration,
            dtype=args.dtype,
            max_shard_size=args.max_shard_size,
            tokenizer_dir=args.tokenizer,
            overwrite=args.overwrite,
        )
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
