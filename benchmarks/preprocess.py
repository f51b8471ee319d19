"""preprocess vs Megatron-LM's preprocess_data design: docs/s and peak memory, same run.

The baseline reproduces Megatron-LM's ``tools/preprocess_data.py`` design: the main process
reads lines and feeds ``multiprocessing.Pool.imap(encode, lines, 32)`` (fork), each worker
parses one JSON line and tokenizes one document per call, and the main process writes every
document through megatron-core's ``IndexedDatasetBuilder`` (dtype from
``DType.optimal_dtype``, as there). Ours is ``megatron_ext.data.preprocess.preprocess``. Both
use the same SentencePiece model (65,536 ids, trained on the generated text unless
``--tokenizer-model`` is given) and the same generated multilingual JSONL.

Every configuration runs in a fresh child process; the parent samples the resident memory of
the child and all its workers every 20 ms (peak of the sum, and peak of the main process) and
checks that both designs wrote the same token ids. Ratios are against the baseline at the same
worker count in this run. The worker sweep runs on the smallest input, the largest worker count
on every input (memory as input grows). Default (about 5 minutes on 2 cores):

    python benchmarks/preprocess.py --sizes-mb 32 128 --workers 1 2 4
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
POOL_BYTES = 16_000_000
LEXICON_SIZE = 50_000


def generate_corpus(path: Path, target_mb: float, seed: int = 0, zipf: bool = True) -> int:
    """Multilingual-looking JSONL (Latin, Cyrillic, Greek, Devanagari, CJK) of ~target_mb MB."""
    rng = random.Random(seed)
    alphabets = [
        ("bcdfghjklmnprstvwz", "aeiou", " "),
        ("бвгджзклмнпрстфхцчшщ", "аеиоуыэюя", " "),
        ("βγδζθκλμνξπρστφχψ", "αεηιουω", " "),
        ("कखगघचछजझटडतथदधनपबभमयरलवशसह", "ािीुूेैोौ", " "),
        ("".join(chr(0x4E00 + i) for i in range(800)), "", ""),
    ]
    lexicons = []
    for consonants, vowels, sep in alphabets:
        words: set[str] = set()
        while len(words) < LEXICON_SIZE:
            syllables = rng.randint(1, 4)
            words.add(
                "".join(
                    rng.choice(consonants) + rng.choice(vowels or [""]) for _ in range(syllables)
                )
            )
        lexicon = sorted(words)
        rng.shuffle(lexicon)  # frequency rank independent of spelling
        lexicons.append((lexicon, sep))
    # Zipf's law (frequency ~ 1 / rank), the classic model of word frequencies in text.
    zipf_weights = list(itertools.accumulate(1.0 / rank for rank in range(1, LEXICON_SIZE + 1)))
    target = int(target_mb * 1e6)
    # Up to POOL_BYTES of distinct documents; larger corpora draw from them again (no
    # tokenizer keeps state across documents except our word cache, which stays bounded).
    pool: list[str] = []
    pool_bytes = 0
    while pool_bytes < min(target, POOL_BYTES):
        words, sep = rng.choice(lexicons)
        num_words = rng.randint(50, 400)
        if zipf:
            picks = rng.choices(words, cum_weights=zipf_weights, k=num_words)
        else:
            picks = [rng.choice(words) for _ in range(num_words)]
        pool.append(sep.join(picks))
        pool_bytes += len(pool[-1].encode("utf-8"))
    written = docs = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            text = pool[docs] if docs < len(pool) else rng.choice(pool)
            line = json.dumps({"text": text, "id": docs}, ensure_ascii=False) + "\n"
            f.write(line)
            written += len(line.encode("utf-8"))
            docs += 1
    return docs


# ---- the baseline: Megatron-LM's preprocess_data design -------------------------------------


class _MegatronStyleEncoder:
    def __init__(self, tokenizer_model: str):
        self.tokenizer_model = tokenizer_model

    def initializer(self) -> None:
        from megatron_ext.tokenizer import load_tokenizer

        _MegatronStyleEncoder.tokenizer = load_tokenizer(
            "SentencePieceTokenizer", self.tokenizer_model
        )

    def encode(self, json_line: str):
        text = json.loads(json_line)["text"]
        ids = _MegatronStyleEncoder.tokenizer.tokenize(text)
        ids.append(_MegatronStyleEncoder.tokenizer.eod)
        return ids, [len(ids)], len(json_line)


def run_megatron_style(input_path: str, prefix: str, tokenizer_model: str, workers: int) -> int:
    import multiprocessing

    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    from megatron_ext.tokenizer import load_tokenizer

    vocab_size = load_tokenizer("SentencePieceTokenizer", tokenizer_model).vocab_size
    encoder = _MegatronStyleEncoder(tokenizer_model)
    pool = multiprocessing.get_context("fork").Pool(workers, initializer=encoder.initializer)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=DType.optimal_dtype(vocab_size))
    docs = 0
    with open(input_path, encoding="utf-8") as fin:
        for ids, lengths, _ in pool.imap(encoder.encode, fin, 32):
            builder.add_document(ids, lengths)  # a list, as Megatron-LM passes it
            docs += 1
    builder.finalize(prefix + ".idx")
    pool.close()
    pool.join()
    return docs


def run_ours(input_path: str, prefix: str, tokenizer_model: str, workers: int) -> int:
    from megatron_ext.data.preprocess import preprocess

    result = preprocess(
        input_path,
        prefix,
        "SentencePieceTokenizer",
        tokenizer_model,
        append_eod=True,
        workers=workers,
        progress=False,
    )
    return result.num_docs


# ---- measurement ------------------------------------------------------------------------------


def measure(design: str, input_path: Path, prefix: Path, tokenizer: str, workers: int) -> dict:
    """Run one configuration in a child process; sample its tree's memory every 20 ms."""
    import psutil

    cmd = [
        sys.executable,
        __file__,
        "--child",
        design,
        "--child-input",
        str(input_path),
        "--child-prefix",
        str(prefix),
        "--tokenizer-model",
        tokenizer,
        "--workers",
        str(workers),
    ]
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    start = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env, text=True)
    proc = psutil.Process(child.pid)
    peak_tree = peak_main = 0
    while child.poll() is None:
        try:
            main = proc.memory_info().rss
            tree = main + sum(c.memory_info().rss for c in proc.children(recursive=True))
        except psutil.Error:
            continue
        peak_main, peak_tree = max(peak_main, main), max(peak_tree, tree)
        time.sleep(0.02)
    out, _ = child.communicate()
    if child.returncode != 0:
        raise RuntimeError(f"{design} with {workers} workers failed (exit {child.returncode})")
    result = json.loads(out.strip().splitlines()[-1])
    result.update(
        wall=time.perf_counter() - start,
        peak_main_mb=peak_main / 2**20,
        peak_tree_mb=peak_tree / 2**20,
    )
    return result


def child_main(args: argparse.Namespace) -> int:
    # Import first: megatron-core's import (seconds) is not part of the design being measured.
    if args.child == "ours":
        import megatron_ext.data.preprocess  # noqa: F401
    else:
        import megatron.core.datasets.indexed_dataset  # noqa: F401
    start = time.perf_counter()
    run = run_ours if args.child == "ours" else run_megatron_style
    docs = run(args.child_input, args.child_prefix, args.tokenizer_model, args.workers[0])
    print(json.dumps({"docs": docs, "seconds": time.perf_counter() - start}))
    return 0


def dataset_ids(prefix: str) -> np.ndarray:
    from megatron_ext.data.indexed_writer import read_index

    index = read_index(prefix)
    return np.fromfile(prefix + ".bin", dtype=index.dtype).astype(np.int64)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes-mb", type=float, nargs="+", default=[32, 128])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--tokenizer-model", default=None)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--child", choices=["ours", "megatron"], help=argparse.SUPPRESS)
    parser.add_argument("--child-input", help=argparse.SUPPRESS)
    parser.add_argument("--child-prefix", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child_main(args)

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_preprocess-"))
    workdir.mkdir(parents=True, exist_ok=True)
    corpora = {}
    for size in sorted(args.sizes_mb):
        path = workdir / f"corpus_{size:g}mb.jsonl"
        docs = generate_corpus(path, size)
        corpora[size] = path
        print(f"corpus {path.name}: {docs} docs, {path.stat().st_size / 1e6:.1f} MB")
    tokenizer = args.tokenizer_model
    if tokenizer is None:
        from megatron_ext.tokenizer.training import TokenizerTrainingConfig, train_tokenizer

        # Uniformly drawn words: enough distinct pieces for 65,536 ids from a few MB.
        generate_corpus(workdir / "tokenizer_text.jsonl", 6, seed=1, zipf=False)
        cfg = TokenizerTrainingConfig(compare_unbalanced=False)
        trained = train_tokenizer(str(workdir / "tokenizer_text.jsonl"), workdir / "tok", cfg)
        tokenizer = trained.model_path
    print(f"tokenizer: {tokenizer}, cpus: {os.cpu_count()}")

    rows = []
    for size, path in corpora.items():
        # The worker sweep on the smallest corpus; the memory check at the most workers on all.
        sweep = args.workers if size == min(corpora) else [max(args.workers)]
        for workers in sweep:
            base = measure("megatron", path, workdir / f"m_{size:g}_{workers}", tokenizer, workers)
            ours = measure("ours", path, workdir / f"o_{size:g}_{workers}", tokenizer, workers)
            same = np.array_equal(
                dataset_ids(str(workdir / f"m_{size:g}_{workers}")),
                dataset_ids(str(workdir / f"o_{size:g}_{workers}_text_document")),
            )
            rows.append((size, workers, base, ours, same))

    print(
        f"\n{'MB':>6} {'workers':>7} {'design':>9} {'docs/s':>9} {'MB/s':>6} {'speedup':>7} "
        f"{'peak main MB':>12} {'peak all MB':>11} same ids"
    )
    for size, workers, base, ours, same in rows:
        for name, r in (("megatron", base), ("ours", ours)):
            rate = r["docs"] / r["seconds"]
            speedup = base["seconds"] / r["seconds"]
            print(
                f"{size:>6g} {workers:>7} {name:>9} {rate:>9.0f} {size / r['seconds']:>6.2f} "
                f"{speedup:>6.2f}x {r['peak_main_mb']:>12.0f} {r['peak_tree_mb']:>11.0f} {same}"
            )
    return 0 if all(row[-1] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
