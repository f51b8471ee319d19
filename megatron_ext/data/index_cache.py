"""Index arrays of the token stream, built once and memory-mapped by every process that reads.

The token stream's index (each split's document ids and lengths, each dataset's shuffled order
per dataset epoch, each blended epoch's document order and start positions) is O(documents):
about 12 + 12 + 14 bytes per document. Held in memory by every process, a corpus of a billion
documents costs tens of GB per process, times the processes of a node. ``IndexCache`` with a
directory writes each array set once and memory-maps it: the operating system's page cache holds
one copy per node (per cluster on a shared filesystem), and a process only touches the pages it
reads (a ``searchsorted`` and a slice per batch).

Entries are keyed by a digest of everything that determines their content (dataset files,
split, seeds, weights, epoch), so a changed dataset or seed never reads a stale index.

Writing is lock-free for correctness: an entry is built into a private temporary directory and
renamed into place in one step, and two processes that build the same entry build the same
bytes, so whichever rename lands second is simply discarded. A ``<entry>.building`` marker,
created exclusively and touched every few seconds while building, only keeps other processes
from duplicating the work: they wait for the entry instead. A marker that stops changing for
``stale_after_s`` (its builder died) is taken over, and the dead builder's temporary
directories of that entry are deleted. Processes on other nodes see the same protocol when the
directory is shared; a node-local directory is built once per node. ``prune`` deletes the
entries a run does not read (``tools/build_data_index.py --prune``).

Without a directory the arrays are built in memory, by the same functions.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
HEARTBEAT_S = 5.0
STALE_AFTER_S = 300.0  # generous: NFS may cache a file's attributes for up to a minute
_ENTRY_NAME = re.compile(r"[a-z_]+-[0-9a-f]{24}")  # what ``entry_name`` returns
_LOAD_RETRIES = 5  # looks at an entry whose files are missing before it is called incomplete


@dataclass
class IndexEntry:
    """The arrays of one entry (memory-mapped when cached) and its scalar facts."""

    arrays: dict[str, np.ndarray]
    info: dict


Builder = Callable[[], IndexEntry]


@dataclass
class IndexCache:
    """Builds each keyed entry once; ``directory=None`` keeps everything in memory."""

    directory: str | None = None
    stale_after_s: float = STALE_AFTER_S
    poll_s: float = 0.2
    """First wait between looks at a marker; each further wait is 1.5 times longer, up to
    ``max_poll_s``, so that a thousand ranks waiting on a shared filesystem do not load its
    metadata server during a build of many minutes."""
    max_poll_s: float = 2.0
    built: list[str] = field(default_factory=list)
    """Names of the entries this process built (for logs and tests)."""
    used: set[str] = field(default_factory=set)
    """Names of every entry this process loaded or built (what ``prune`` keeps)."""

    def __post_init__(self) -> None:
        if self.directory is not None:
            os.makedirs(self.directory, exist_ok=True)

    def get(self, kind: str, key: dict, build: Builder) -> IndexEntry:
        """The entry of ``kind`` for ``key``: loaded if present, else built (here or elsewhere)."""
        if self.directory is None:
            return build()
        name = entry_name(kind, key)
        self.used.add(name)
        path = os.path.join(self.directory, name)
        marker = path + ".building"
        last_seen: tuple[float, float] | None = None  # (marker mtime, when it last changed)
        delay = self.poll_s
        failed_loads = 0
        while True:
            if os.path.isdir(path):
                try:
                    return _load(path, kind, key)
                except FileNotFoundError as exc:
                    # Deleted while being read (``prune``), or left incomplete: look again; an
                    # entry still there and incomplete after a few looks is an error.
                    failed_loads += 1
                    if failed_loads > _LOAD_RETRIES:
                        raise ValueError(
                            f"index entry {path} is incomplete ({exc.filename} is missing); "
                            "delete it and it will be rebuilt"
                        ) from exc
                    time.sleep(delay)
                    delay = min(delay * 1.5, self.max_poll_s)
                    continue
            failed_loads = 0  # the entry is gone: a later one is a new entry
            if _create_exclusive(marker):
                try:
                    if not os.path.isdir(path):  # else published since the look above
                        self._build_and_publish(path, marker, kind, key, build)
                finally:
                    _remove(marker)
                continue  # load it as any other process does
            mtime = _mtime(marker)
            now = time.monotonic()
            if mtime is None:
                continue  # the builder just finished or gave up: look again
            if last_seen is None:
                logger.info("index entry %s: waiting for %s", name, _owner(marker))
            if last_seen is None or last_seen[0] != mtime:
                last_seen = (mtime, now)
            elif now - last_seen[1] > self.stale_after_s:
                self._take_over(name, marker, now - last_seen[1])
                last_seen = None
                continue
            time.sleep(delay)
            delay = min(delay * 1.5, self.max_poll_s)

    def _take_over(self, name: str, marker: str, silent_s: float) -> None:
        """Remove a dead builder's marker and the temporary directories it left."""
        logger.warning(
            "index entry %s: its builder stopped updating %s for %.0f s; building it here",
            name,
            marker,
            silent_s,
        )
        _remove(marker)
        for temp in _stale_temps(self.directory, name, self.stale_after_s):
            logger.warning("index entry %s: removing %s, left by its builder", name, temp)
            shutil.rmtree(temp, ignore_errors=True)

    def _build_and_publish(
        self, path: str, marker: str, kind: str, key: dict, build: Builder
    ) -> None:
        stop = threading.Event()
        heartbeat = threading.Thread(
            target=_heartbeat, args=(marker, stop), name="index-heartbeat", daemon=True
        )
        heartbeat.start()
        start = time.perf_counter()
        try:
            entry = build()
            _publish(path, kind, key, entry)
        finally:
            stop.set()
            heartbeat.join()
        self.built.append(os.path.basename(path))
        logger.info(
            "built index entry %s in %.1f s", os.path.basename(path), time.perf_counter() - start
        )


@dataclass
class PruneReport:
    removed: list[str]  # names in the directory
    freed_bytes: int


def prune(directory: str, keep: set[str], stale_after_s: float = STALE_AFTER_S) -> PruneReport:
    """Delete the entries of ``directory`` not named in ``keep``, and what dead builders left.

    Removes every entry directory (``<kind>-<digest>``) whose name is not in ``keep`` (complete,
    or incomplete and unchanged for ``stale_after_s``: what an interrupted removal left), and
    build markers and ``.tmp-`` directories unchanged for ``stale_after_s`` (their builder is
    gone). An entry is first renamed to a ``.tmp-`` name, so a removal that fails part-way (an
    NFS file still open elsewhere) leaves no half entry under the entry's name, where it would
    block its rebuild; a later prune removes the rest. Anything else in the directory is left
    alone, and so is what other processes rename or delete meanwhile. On a local filesystem a
    process that has an entry memory-mapped keeps reading it (the files stay until unmapped); on
    NFS another node's mapping of a deleted file fails, so prune a shared directory only while
    no job reads it.
    """
    removed, freed = [], 0
    now = time.time()
    for item in sorted(os.scandir(directory), key=lambda e: e.name):
        if not _prunable(item, keep, now, stale_after_s):
            continue
        size = tree_bytes(item.path)
        if item.is_dir(follow_symlinks=False):
            trash = os.path.join(
                directory, f".tmp-pruned-{item.name}-{socket.gethostname()}-{os.getpid()}"
            )
            try:
                os.rename(item.path, trash)
            except OSError:
                continue  # removed or renamed by another process meanwhile
            shutil.rmtree(trash, ignore_errors=True)
        else:
            _remove(item.path)
        freed += size
        removed.append(item.name)
    return PruneReport(removed, freed)


def _prunable(item: os.DirEntry, keep: set[str], now: float, stale_after_s: float) -> bool:
    if item.is_dir(follow_symlinks=False) and _ENTRY_NAME.fullmatch(item.name):
        if item.name in keep:
            return False
        if os.path.exists(os.path.join(item.path, "meta.json")):
            return True
        changed = _newest_mtime(item.path)  # incomplete: what an interrupted removal left
        return changed is not None and now - changed > stale_after_s
    if item.name.startswith(".tmp-") and item.is_dir(follow_symlinks=False):
        changed = _newest_mtime(item.path)
    elif item.name.endswith(".building") and item.is_file(follow_symlinks=False):
        changed = _mtime(item.path)
    else:
        return False
    return changed is not None and now - changed > stale_after_s  # None: gone meanwhile


def entry_name(kind: str, key: dict) -> str:
    """``<kind>-<digest>``: the digest covers the format version and every field of ``key``."""
    text = json.dumps({"format": FORMAT_VERSION, "kind": kind, "key": key}, sort_keys=True)
    return f"{kind}-{hashlib.sha256(text.encode()).hexdigest()[:24]}"


def _publish(path: str, kind: str, key: dict, entry: IndexEntry) -> None:
    directory = os.path.dirname(path)
    tmp = os.path.join(
        directory,
        f".tmp-{os.path.basename(path)}-{socket.gethostname()}-{os.getpid()}-"
        f"{threading.get_ident()}",
    )
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        shapes = {}
        for array_name, array in entry.arrays.items():
            array = np.ascontiguousarray(array)
            file = os.path.join(tmp, array_name + ".npy")
            with open(file, "wb") as f:
                np.save(f, array, allow_pickle=False)
                f.flush()
                os.fsync(f.fileno())
            shapes[array_name] = [array.dtype.str, list(array.shape)]
        meta = {
            "format": FORMAT_VERSION,
            "kind": kind,
            "key": key,
            "arrays": shapes,
            "info": entry.info,
        }
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.rename(tmp, path)
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not os.path.isdir(path):
                raise
            # Another process published the same entry first; its bytes are the same.
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load(path: str, kind: str, key: dict) -> IndexEntry:
    with open(os.path.join(path, "meta.json")) as f:
        meta = json.load(f)
    expected_key = json.loads(json.dumps(key))  # as stored: tuples become lists
    stored_key = meta.get("key")
    if (
        meta.get("format") != FORMAT_VERSION
        or meta.get("kind") != kind
        or stored_key != expected_key
    ):
        raise ValueError(
            f"index entry {path} does not hold what its name says (kind {meta.get('kind')!r}, "
            f"key {meta.get('key')!r}); delete it and it will be rebuilt"
        )
    arrays = {}
    for array_name, (dtype, shape) in meta["arrays"].items():
        array = np.load(os.path.join(path, array_name + ".npy"), mmap_mode="r")
        if array.dtype.str != dtype or list(array.shape) != shape:
            raise ValueError(
                f"index entry {path}: {array_name}.npy is {array.dtype.str} {list(array.shape)}, "
                f"meta.json says {dtype} {shape}; delete the entry and it will be rebuilt"
            )
        arrays[array_name] = array
    return IndexEntry(arrays, meta["info"])


def _create_exclusive(marker: str) -> bool:
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(f"{socket.gethostname()} {os.getpid()}\n")
    return True


def _owner(marker: str) -> str:
    try:
        with open(marker) as f:
            host_pid = f.read().split()
    except FileNotFoundError:
        return "its builder"
    return f"process {host_pid[1]} on {host_pid[0]}" if len(host_pid) == 2 else "its builder"


def _heartbeat(marker: str, stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_S):
        try:
            os.utime(marker)
        except FileNotFoundError:
            return  # taken over, or the build ended
        except OSError as exc:
            # A transient error of a shared filesystem (ESTALE, EIO): a heartbeat that stopped
            # here would let waiters take a live build over after ``STALE_AFTER_S``.
            logger.warning("index build marker %s: %s; touching it again", marker, exc)


def _mtime(path: str) -> float | None:
    try:
        return os.stat(path).st_mtime
    except FileNotFoundError:
        return None


def _stale_temps(directory: str, name: str, stale_after_s: float) -> list[str]:
    """Temporary directories of entry ``name`` that nothing wrote to for ``stale_after_s``."""
    now = time.time()
    return [
        item.path
        for item in os.scandir(directory)
        if item.name.startswith(f".tmp-{name}-") and _prunable(item, set(), now, stale_after_s)
    ]


def _newest_mtime(path: str) -> float | None:
    """The newest modification time of a directory and its files; None if it is gone."""
    own = _mtime(path)
    if own is None:
        return None
    files = (_mtime(os.path.join(root, file)) for root, _, names in os.walk(path) for file in names)
    return max([own, *(t for t in files if t is not None)])


def tree_bytes(path: str) -> int:
    """Bytes of a file or of the files under a directory (what still exists)."""
    if not os.path.isdir(path):
        return _size(path)
    files = (os.path.join(root, file) for root, _, names in os.walk(path) for file in names)
    return sum(_size(file) for file in files)


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except FileNotFoundError:
        return 0


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
