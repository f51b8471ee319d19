"""A queue that hands picklable results from forked processes back to their parent, through files.

dist_checkpointing's file writer reports what it wrote through a queue: the writing happens in
the saving process itself (a synchronous save) or in a process forked from it (a background
save, ``checkpoint.async_save``), and the saving process reads the report once the writer has
finished. megatron-core takes that queue from a multiprocessing manager started with *spawn*,
whose server process re-imports the launching script; on CPU the compatibility layer hands it
this queue instead (see ``cpu_compat``).

Why files rather than ``multiprocessing.Queue``: a forked writer that puts a report larger than
a pipe's buffer into a ``multiprocessing.Queue`` cannot exit until somebody reads it, while the
parent only reads once the writer has exited; a file has no such limit. Every item is written to
a temporary name and renamed into place, so a reader never sees half an item. Items come out
oldest first. The directory is removed when the queue is garbage-collected in the process that
created it (forked children never remove it).
"""

from __future__ import annotations

import os
import pickle
import queue
import shutil
import tempfile
import time
import uuid
import weakref
from pathlib import Path
from typing import Any

_SUFFIX = ".pkl"


def _remove_if_owner(directory: str, owner_pid: int) -> None:
    if os.getpid() == owner_pid:
        shutil.rmtree(directory, ignore_errors=True)


class FileQueue:
    """``put`` / ``get_nowait`` / ``get`` over one private directory; safe across ``fork``."""

    def __init__(self, directory: str | Path | None = None) -> None:
        if directory is None:
            directory = tempfile.mkdtemp(prefix="megatron_ext_results_")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._cleanup = weakref.finalize(self, _remove_if_owner, str(self.directory), os.getpid())

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        name = f"{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        temp = self.directory / f".{name}.tmp"
        with open(temp, "wb") as handle:
            pickle.dump(item, handle, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(temp, self.directory / f"{name}{_SUFFIX}")

    def _entries(self) -> list[Path]:
        return sorted(
            path
            for path in self.directory.iterdir()
            if path.name.endswith(_SUFFIX) and not path.name.startswith(".")
        )

    def get_nowait(self) -> Any:
        entries = self._entries()
        if not entries:
            raise queue.Empty
        with open(entries[0], "rb") as handle:
            item = pickle.load(handle)
        entries[0].unlink()
        return item

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                return self.get_nowait()
            except queue.Empty:
                if not block or (deadline is not None and time.monotonic() >= deadline):
                    raise
            time.sleep(0.01)

    def empty(self) -> bool:
        return not self._entries()

    def close(self) -> None:
        """Remove the directory now (in the creating process)."""
        self._cleanup()
