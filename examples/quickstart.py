"""The whole recipe end to end on a laptop-sized example, on CPU.

    python examples/quickstart.py                 # 8 processes: TP2 x PP2 x DP2 over gloo
    python examples/quickstart.py --nproc 4 --steps 100

1. writes the built-in multilingual corpus (UDHR text shipped in the `gflanguages` package);
2. curates it: cleaning, quality rules, language id, exact + near dedup, perplexity filter;
3. trains a SentencePiece BPE tokenizer with language-balanced sampling (a small vocabulary: the
   corpus is small; the recipe's 65,536 is the tool's default);
4. tokenizes the curated text into a Megatron indexed dataset (`.bin/.idx`);
5. trains a tiny Llama-style model with megatron-core under torchrun
   (`examples/configs/tiny_cpu.yaml`),
   with the sequence-length curriculum, warmup + cosine LR, checkpoints and monitoring;
6. prints a summary and draws the dashboard PNG.

Everything lands in ``--work-dir`` (default ``runs/demo``); an existing work dir is reused step by
step (delete it to start over).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _step(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def build_data(work: Path, vocab_size: int) -> tuple[Path, Path, int]:
    """Corpus -> curation -> tokenizer -> indexed dataset: (tokenizer dir, prefix, vocab)."""
    from megatron_ext.config.loader import load_config
    from megatron_ext.curation.builtin_corpus import write_builtin_corpus
    from megatron_ext.curation.config import CurationConfig
    from megatron_ext.curation.pipeline import run_curation
    from megatron_ext.data.preprocess import preprocess
    from megatron_ext.tokenizer import load_tokenizer
    from megatron_ext.tokenizer.training import TokenizerTrainingConfig, train_tokenizer

    raw = work / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    _step("1. built-in multilingual corpus")
    train_docs = write_builtin_corpus(raw / "train.jsonl", split="train")
    heldout_docs = write_builtin_corpus(raw / "heldout.jsonl", split="heldout")
    print(f"{train_docs} training and {heldout_docs} held-out documents in {raw}")

    curated = work / "curated"
    _step("2. curation")
    if not list(curated.glob("curated-*")):
        config = load_config(CurationConfig, REPO / "examples/configs/curation_demo.yaml")
        report = run_curation(config, [str(raw / "train.jsonl")], curated, workers=2)
        print(report.summary())
    else:
        print(f"reusing {curated}")
    shards = sorted(glob.glob(str(curated / "curated-*")))

    tokenizer_dir = work / "tokenizer"
    _step("3. tokenizer")
    if not (tokenizer_dir / "tokenizer.model").exists():
        trained = train_tokenizer(
            shards,
            tokenizer_dir,
            TokenizerTrainingConfig(vocab_size=vocab_size),
            heldout_inputs=[str(raw / "heldout.jsonl")],
        )
        print(f"wrote {trained.model_path}")
    tokenizer = load_tokenizer("SentencePieceTokenizer", str(tokenizer_dir))
    print(f"vocabulary {tokenizer.vocab_size}, end-of-document id {tokenizer.eod}")

    prefix = work / "tokens" / "corpus"
    _step("4. indexed dataset")
    prefix.parent.mkdir(parents=True, exist_ok=True)
    if not Path(f"{prefix}_text_document.idx").exists():
        result = preprocess(
            shards,
            str(prefix),
            "SentencePieceTokenizer",
            str(tokenizer_dir),
            append_eod=True,
            workers=1,
            progress=False,
        )
        print(result)
    return tokenizer_dir, Path(f"{prefix}_text_document"), tokenizer.vocab_size


def train(work: Path, tokenizer_dir: Path, dataset: Path, vocab: int, nproc: int, steps: int):
    """Run the tiny config under torchrun; returns the run directory."""
    run_dir = work / "run"
    layouts = {8: (2, 2), 4: (2, 1), 2: (1, 2), 1: (1, 1)}
    if nproc not in layouts:
        raise SystemExit(f"--nproc must be one of {sorted(layouts)}")
    tp, pp = layouts[nproc]
    _step(f"5. training on {nproc} CPU processes (TP{tp} x PP{pp} x DP{nproc // (tp * pp)})")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "megatron_ext.train",
        "--config",
        str(REPO / "examples/configs/tiny_cpu.yaml"),
        f"--run_dir={run_dir}",
        f"--data.data_path=[{dataset}]",
        f"--tokenizer.tokenizer_model={tokenizer_dir}",
        f"--model.vocab_size={vocab}",
        f"--parallel.tensor_model_parallel_size={tp}",
        f"--parallel.pipeline_model_parallel_size={pp}",
        f"--parallel.sequence_parallel={'true' if tp > 1 else 'false'}",
        f"--schedule.train_steps={steps}",
        "--parallel.device=cpu",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    began = time.time()
    subprocess.run(command, check=True, env=env, cwd=REPO)
    print(f"training took {time.time() - began:.0f} s")
    return run_dir


def summarize(run_dir: Path) -> None:
    _step("6. summary")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r.get("loss") is not None]
    first, last = steps[0], steps[-1]
    val = [r["val_loss"] for r in rows if r.get("val_loss") is not None]
    print(f"steps: {last['step']}, tokens: {last['consumed_tokens']:,}")
    print(f"loss: {first['loss']:.3f} at step {first['step']} -> {last['loss']:.3f}")
    if val:
        print(f"validation loss: {val[0]:.3f} -> {val[-1]:.3f}")
        print(
            "(the built-in corpus holds a few thousand tokens, so the model memorises it: a "
            "rising validation loss is expected here)"
        )
    print(f"sequence length: {first['seq_length']} -> {last['seq_length']} (curriculum)")
    print(f"checkpoints: {sorted(p.name for p in (run_dir / 'checkpoints').glob('iter_*'))}")
    subprocess.run(
        [sys.executable, str(REPO / "tools/plot_run.py"), str(run_dir)], check=False, cwd=REPO
    )
    print(f"metrics: {run_dir / 'metrics.jsonl'}; dashboards: {run_dir / 'plots'}/*.png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", default="runs/demo")
    parser.add_argument("--nproc", type=int, default=8, help="CPU processes (8, 4, 2 or 1)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--vocab-size", type=int, default=2048)
    args = parser.parse_args(argv)
    work = Path(args.work_dir).resolve()
    tokenizer_dir, dataset, vocab = build_data(work, args.vocab_size)
    run_dir = train(work, tokenizer_dir, dataset, vocab, args.nproc, args.steps)
    summarize(run_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
