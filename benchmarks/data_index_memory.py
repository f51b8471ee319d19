"""Memory of the data index per node: held by every process against memory-mapped from files.

A synthetic corpus of many short documents (the index is O(documents), the tokens do not
matter) is read by ``--processes`` processes started together, as the ranks of one node would,
in three modes:

  memory   every process builds the index in its own memory (``data.index_cache_dir`` unset)
  cold     ``index_cache_dir`` set and empty: one process builds each entry, the others wait
  warm     the same directory again: every process only memory-maps (a restart, or after
           ``tools/build_data_index.py``)

Each process reads batches at the start of the first epoch and past its middle (which builds the
next epoch, as training does) and reports its proportional set size (PSS: shared pages divided
among the processes that map them) minus what it held before building the streams, and the time
until its first batch. PSS is split into anonymous memory (the process's own arrays; not
reclaimable) and file-backed pages (the mapped index, dataset ``.bin``/``.idx`` pages: shared
by the node and reclaimable page cache). Printed: per mode the sums over processes (the node's
memory) and the slowest first batch, and the ratios of ``cold`` and ``warm`` to ``memory``.
Then one more process, alone, builds the index of the first blended epoch (the split, each
dataset's order, the epoch) into an empty directory, as ``tools/build_data_index.py`` does, and
reports its peak resident memory above what it held before, per training document, against the
size of what it wrote (the ratio says how many times the index itself the builder needs).
CPU example (about 3 minutes on 2 cores; results in docs/data_and_schedules.md):

    python benchmarks/data_index_memory.py --documents 4000000 --processes 4
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

from megatron_ext.data.config import DataConfig
from megatron_ext.data.index_cache import IndexCache, tree_bytes
from megatron_ext.data.indexed_writer import IndexedDatasetWriter
from megatron_ext.data.token_stream import build_token_streams


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--documents", type=int, default=4_000_000, help="documents per dataset")
    parser.add_argument("--datasets", type=int, default=2, help="datasets blended")
    parser.add_argument("--processes", type=int, default=4, help="reading processes")
    parser.add_argument("--batch-tokens", type=int, default=2 * 8192, help="tokens per read")
    parser.add_argument(
        "--build-only", action="store_true", help="measure only the process that builds"
    )
    return parser.parse_args()


def _write_corpus(directory: Path, num_datasets: int, num_documents: int) -> list[str]:
    rng = np.random.default_rng(0)
    prefixes = []
    for d in range(num_datasets):
        prefix = str(directory / f"corpus{d}")
        writer = IndexedDatasetWriter(prefix, np.uint16)
        for start in range(0, num_documents, 1_000_000):
            count = min(1_000_000, num_documents - start)
            lengths = rng.integers(4, 17, count).astype(np.int32)
            ids = rng.integers(3, 60000, int(lengths.sum())).astype(np.uint16)
            writer.add_batch(ids, lengths, np.ones(count, dtype=np.int64))
        writer.finalize()
        prefixes.append(prefix)
    return prefixes


def _pss_bytes() -> np.ndarray:
    """[anonymous, file-backed] proportional set size of this process, in bytes."""
    fields = {}
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            name, _, rest = line.partition(":")
            fields[name] = rest.split()[0] if rest.split() else ""
    if "Pss_Anon" not in fields:
        raise RuntimeError("this kernel's /proc/self/smaps_rollup has no Pss_Anon line")
    return np.array([int(fields["Pss_Anon"]), int(fields["Pss_File"])], dtype=np.int64) * 1024


def _reader(config: DataConfig, batch_tokens: int, start_gate, results) -> None:
    start_gate.wait()
    before = _pss_bytes()
    start = time.perf_counter()
    streams = build_token_streams(config, IndexCache(config.index_cache_dir))
    streams.train.read(0, batch_tokens)
    first_batch_s = time.perf_counter() - start
    epoch = streams.train.tokens_per_epoch_nominal
    streams.train.read(int(epoch * 0.6), batch_tokens)  # past the middle: next epoch built
    streams.train.wait_for_background()
    streams.train.read(epoch + 1000, batch_tokens)
    results.put((_pss_bytes() - before, first_batch_s))


def _builder(config: DataConfig, results) -> None:
    with open("/proc/self/status") as f:
        before = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) * 1024
    start = time.perf_counter()
    streams = build_token_streams(config, IndexCache(config.index_cache_dir))
    streams.train.prepare_epochs(1)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    documents = sum(len(source) for source in streams.train.sources)
    results.put((peak - before, time.perf_counter() - start, documents))


def _measure_build(config: DataConfig) -> tuple[int, float, int]:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    worker = ctx.Process(target=_builder, args=(config, results))
    worker.start()
    report = results.get(timeout=1800)
    worker.join()
    if worker.exitcode != 0:
        raise RuntimeError(f"the builder exited with code {worker.exitcode}")
    return report


def _measure(config: DataConfig, processes: int, batch_tokens: int) -> tuple[np.ndarray, float]:
    ctx = mp.get_context("spawn")
    gate, results = ctx.Barrier(processes), ctx.Queue()
    workers = [
        ctx.Process(target=_reader, args=(config, batch_tokens, gate, results))
        for _ in range(processes)
    ]
    for worker in workers:
        worker.start()
    reports = [results.get(timeout=1800) for _ in workers]
    for worker in workers:
        worker.join()
        if worker.exitcode != 0:
            raise RuntimeError(f"a reader exited with code {worker.exitcode}")
    return sum(r[0] for r in reports), max(r[1] for r in reports)


def main() -> None:
    args = _parse()
    with tempfile.TemporaryDirectory(prefix="data_index_bench_") as tmp:
        tmp_path = Path(tmp)
        prefixes = _write_corpus(tmp_path, args.datasets, args.documents)
        base = dict(data_path=prefixes, blend_weights=[1.0] * args.datasets, split="99,1")
        modes = {
            "memory": DataConfig(**base),
            "cold": DataConfig(**base, index_cache_dir=str(tmp_path / "index")),
            "warm": DataConfig(**base, index_cache_dir=str(tmp_path / "index")),
        }
        measured = {
            name: _measure(config, args.processes, args.batch_tokens)
            for name, config in modes.items()
            if not args.build_only
        }
        on_disk = 0 if args.build_only else tree_bytes(str(tmp_path / "index"))
        build_dir = tmp_path / "index_build"
        build_peak, build_s, train_documents = _measure_build(
            DataConfig(**base, index_cache_dir=str(build_dir))
        )
        build_on_disk = tree_bytes(str(build_dir))
    if measured:
        _print_readers(measured, args.datasets * args.documents, args.processes, on_disk)
    print(
        f"building the first epoch's index in one process: peak {build_peak / 2**20:.0f} MiB "
        f"above its start, {build_peak / train_documents:.1f} bytes per training document, "
        f"{build_s:.1f} s; written {build_on_disk / train_documents:.1f} bytes per document; "
        f"peak/written {build_peak / build_on_disk:.2f}"
    )


def _print_readers(measured: dict, documents: int, processes: int, on_disk: int) -> None:
    print(
        f"{documents:,} documents, {processes} processes, index on disk {on_disk / 2**20:.0f} MiB"
    )
    print("PSS added by the index and the reads, summed over the processes (MiB):")
    print(f"{'mode':<8} {'anonymous':>10} {'file-backed':>12} {'total':>8} {'first batch s':>14}")
    for name, (pss, first) in measured.items():
        anon, file = pss / 2**20
        print(f"{name:<8} {anon:>10.1f} {file:>12.1f} {anon + file:>8.1f} {first:>14.2f}")
    memory = measured["memory"][0]
    for name in ("cold", "warm"):
        pss = measured[name][0]
        print(
            f"{name}/memory: anonymous {pss[0] / max(memory[0], 1):.3f}, "
            f"total {pss.sum() / memory.sum():.3f}"
        )


if __name__ == "__main__":
    main()
