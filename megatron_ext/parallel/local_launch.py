"""Run a function on N local processes joined in one gloo process group (tests, tools).

Each process gets torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)
and calls ``fn(rank, *args)``; the return value of every rank comes back to the caller, in rank
order. Processes are spawned, not forked (megatron-core and gloo keep threads that a fork would
copy in a broken state); an exception in any rank is re-raised here with its traceback.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp

from megatron_ext.parallel.ports import find_free_port


def _entry(local_rank: int, fn, args, world_size: int, port: int, out_dir: str, env: dict) -> None:
    os.environ.update(env)
    os.environ.update(
        {
            "RANK": str(local_rank),
            "LOCAL_RANK": str(local_rank),
            "WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
        }
    )
    result = fn(local_rank, *args)
    with open(Path(out_dir) / f"rank{local_rank}.pkl", "wb") as handle:
        pickle.dump(result, handle)


def run_on_local_processes(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    env: dict[str, str] | None = None,
) -> list[Any]:
    """``[fn(0, *args), ..., fn(world_size - 1, *args)]``, each computed in its own process.

    ``fn`` must be importable (a module-level function) because the processes are spawned.
    """
    with tempfile.TemporaryDirectory(prefix="megatron_ext_spawn_") as out_dir:
        mp.start_processes(
            _entry,
            args=(fn, args, world_size, find_free_port(), out_dir, dict(env or {})),
            nprocs=world_size,
            join=True,
            start_method="spawn",
        )
        results = []
        for rank in range(world_size):
            with open(Path(out_dir) / f"rank{rank}.pkl", "rb") as handle:
                results.append(pickle.load(handle))
        return results
