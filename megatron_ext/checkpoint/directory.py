"""The on-disk layout of a save directory, and the file operations that keep it crash-safe.

::

    <save_dir>/
      latest                      # text: the name of the newest complete checkpoint
      iter_0000010/               # one complete checkpoint per saved step
        metadata.json .metadata common.pt __<rank>_<n>.distcp   (dist_checkpointing, torch_dist)
        checkpoint.json           # step, parallel layout, format version, the files written
        run_state.json            # data position, curriculum state, what the loop passed
        config.yaml               # the resolved experiment config
        versions.json             # python, torch, megatron-core, megatron_ext
      iter_0000020.tmp-<id>/      # a save in progress (or one a crash interrupted)

A save writes into a ``.tmp-<id>`` directory, verifies it, renames it to ``iter_XXXXXXX`` and
only then replaces ``latest`` (temp file, fsync, ``os.replace``). A crash at any point therefore
leaves ``latest`` on the previous complete checkpoint. Directories are deleted by renaming them to
``.deleting-<id>`` first, so a half-deleted checkpoint never looks complete. Everything here runs
on one rank; nothing here needs a process group.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import uuid
import zipfile
from pathlib import Path

import yaml

logger = logging.getLogger(__name__)

LATEST_FILE = "latest"
CHECKPOINT_FILE = "checkpoint.json"
RUN_STATE_FILE = "run_state.json"
CONFIG_FILE = "config.yaml"
VERSIONS_FILE = "versions.json"
OWN_FILES = (CHECKPOINT_FILE, RUN_STATE_FILE, CONFIG_FILE, VERSIONS_FILE)
DIST_FILES = ("metadata.json", "common.pt", ".metadata")

_NAME = re.compile(r"^iter_(\d{7,})$")
_TEMP = re.compile(r"^iter_\d{7,}\.(tmp|deleting)-[0-9a-f]+$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written, found or loaded; the message says which and why."""


def checkpoint_name(step: int) -> str:
    return f"iter_{step:07d}"


def parse_step(name: str) -> int | None:
    """The step of a complete checkpoint directory name, None for anything else."""
    match = _NAME.match(name)
    return int(match.group(1)) if match else None


def list_checkpoints(save_dir: Path) -> list[tuple[int, Path]]:
    """Complete (renamed into place) checkpoint directories, oldest first."""
    if not save_dir.is_dir():
        return []
    found = []
    for child in save_dir.iterdir():
        step = parse_step(child.name)
        if step is not None and child.is_dir():
            found.append((step, child))
    return sorted(found)


def new_temp_dir(save_dir: Path, step: int, token: str | None = None) -> Path:
    """The path a save of ``step`` writes into before it is verified and renamed."""
    return save_dir / f"{checkpoint_name(step)}.tmp-{token or uuid.uuid4().hex[:12]}"


def stale_temp_dirs(save_dir: Path) -> list[Path]:
    """Left-overs of interrupted saves or deletions."""
    if not save_dir.is_dir():
        return []
    return sorted(p for p in save_dir.iterdir() if _TEMP.match(p.name))


def remove_stale_temp_dirs(save_dir: Path) -> list[Path]:
    """Delete and report left-overs of interrupted saves; returns what was removed."""
    removed = stale_temp_dirs(save_dir)
    for path in removed:
        logger.warning("removing %s: left over by an interrupted checkpoint save or deletion", path)
        shutil.rmtree(path, ignore_errors=True)
    return removed


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``path`` so that readers see the old or the new content, never a part."""
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:12]}")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def write_json(path: Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, indent=1, sort_keys=True) + "\n")


def read_latest(save_dir: Path) -> str | None:
    """The checkpoint name ``latest`` holds, None when there is no ``latest``."""
    path = save_dir / LATEST_FILE
    if not path.exists():
        return None
    name = path.read_text(encoding="utf-8").strip()
    if parse_step(name) is None:
        raise CheckpointError(
            f"{path} holds {name!r}, not a checkpoint name like iter_0001000; write the name of a "
            f"complete checkpoint into it or set checkpoint.load to one"
        )
    return name


def write_latest(save_dir: Path, name: str) -> None:
    write_text_atomic(save_dir / LATEST_FILE, name + "\n")


def publish(temp_dir: Path, final_dir: Path) -> None:
    """Rename a verified save into place, replacing an earlier save of the same step."""
    aside = None
    if final_dir.exists():
        # Saving a step twice: after a crash between the rename and the update of ``latest``, or
        # a re-run that ends on the same step. The old directory goes only once the new one is in.
        logger.warning("replacing the existing checkpoint %s", final_dir)
        aside = final_dir.with_name(f"{final_dir.name}.deleting-{uuid.uuid4().hex[:12]}")
        os.replace(final_dir, aside)
    os.replace(temp_dir, final_dir)
    _fsync_dir(final_dir.parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def remove_dir(path: Path) -> None:
    """Delete a directory; a crash half-way leaves a ``.deleting-`` name, never a checkpoint."""
    doomed = path.with_name(f"{path.name}.deleting-{uuid.uuid4().hex[:12]}")
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def verify_checkpoint(path: Path, expected_files: list[str] | None = None) -> list[str]:
    """Problems that make ``path`` unusable, each naming a file; empty when it is complete.

    Checks that the dist_checkpointing files exist and parse, that every storage file the
    tensor index refers to exists and is long enough, that our JSON/YAML files parse and that
    every file the save listed in ``checkpoint.json`` is present.
    """
    if not path.is_dir():
        return [f"{path}: directory does not exist"]
    problems: list[str] = []
    for name in (*DIST_FILES, *OWN_FILES):
        if not (path / name).is_file():
            problems.append(f"{path / name}: missing")
    if problems:
        return problems
    problems += _check_parses(path)
    problems += _check_storage(path)
    listed = expected_files
    if listed is None:
        try:
            listed = json.loads((path / CHECKPOINT_FILE).read_text(encoding="utf-8"))["files"]
        except (ValueError, KeyError, TypeError):
            listed = []
    for name in listed:
        if not (path / name).is_file():
            problems.append(
                f"{path / name}: missing (written by the save, listed in checkpoint.json)"
            )
    return problems


def _check_parses(path: Path) -> list[str]:
    problems = []
    for name in ("metadata.json", CHECKPOINT_FILE, RUN_STATE_FILE, VERSIONS_FILE):
        try:
            value = json.loads((path / name).read_text(encoding="utf-8"))
            if not isinstance(value, dict):
                problems.append(f"{path / name}: not a JSON object")
        except (ValueError, UnicodeDecodeError) as exc:
            problems.append(f"{path / name}: unreadable JSON ({exc})")
    try:
        config = yaml.safe_load((path / CONFIG_FILE).read_text(encoding="utf-8"))
        if not isinstance(config, dict):
            problems.append(f"{path / CONFIG_FILE}: not a mapping")
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        problems.append(f"{path / CONFIG_FILE}: unreadable YAML ({exc})")
    try:
        with zipfile.ZipFile(path / "common.pt") as archive:
            bad = archive.testzip()
        if bad is not None:
            problems.append(f"{path / 'common.pt'}: corrupt member {bad}")
    except (zipfile.BadZipFile, OSError) as exc:
        problems.append(f"{path / 'common.pt'}: unreadable ({exc})")
    return problems


def _check_storage(path: Path) -> list[str]:
    from torch.distributed.checkpoint import FileSystemReader

    try:
        metadata = FileSystemReader(str(path)).read_metadata()
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a corrupt index
        return [f"{path / '.metadata'}: unreadable tensor index ({type(exc).__name__}: {exc})"]
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        end = info.offset + info.length
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    problems = []
    for name, end in sorted(needed.items()):
        file = path / name
        if not file.is_file():
            problems.append(f"{file}: missing (referenced by .metadata)")
        elif file.stat().st_size < end:
            problems.append(f"{file}: truncated ({file.stat().st_size} bytes, needs {end})")
    return problems


def directory_bytes(path: Path) -> int:
    """The size of every file below ``path``."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def check_free_space(save_dir: Path, step: int, free_bytes: int | None = None) -> None:
    """Refuse a save that the filesystem of ``save_dir`` cannot hold, before anything is written.

    The estimate is the size of the newest complete checkpoint (the saves of one run are about
    the same size) plus 5%; with no checkpoint yet there is nothing to compare with and the save
    goes ahead. Retention deletes old checkpoints only after the new one is published, so one
    more checkpoint must fit. ``free_bytes`` defaults to what the filesystem reports.
    """
    checkpoints = list_checkpoints(save_dir)
    if not checkpoints:
        return
    newest = checkpoints[-1][1]
    needed = int(directory_bytes(newest) * 1.05)
    free = shutil.disk_usage(save_dir).free if free_bytes is None else free_bytes
    if free < needed:
        raise CheckpointError(
            f"not enough free space in {save_dir} for the checkpoint of step {step}: "
            f"{newest.name} takes {needed / 1.05 / 1e9:.2f} GB, {free / 1e9:.2f} GB are free. "
            "Free space, lower checkpoint.keep_last, or point checkpoint.save_dir elsewhere "
            "(checkpoint.check_free_space=false skips this check on filesystems whose free "
            "space report is not meaningful)"
        )


def last_good_checkpoint(save_dir: Path, exclude: Path | None = None) -> Path | None:
    """The newest complete checkpoint that verifies, other than ``exclude``."""
    for _, path in reversed(list_checkpoints(save_dir)):
        if exclude is not None and path.resolve() == exclude.resolve():
            continue
        if not verify_checkpoint(path):
            return path
    return None


def apply_retention(save_dir: Path, keep_last: int | None) -> list[Path]:
    """Delete all but the ``keep_last`` newest checkpoints; never the one ``latest`` names."""
    if keep_last is None:
        return []
    checkpoints = list_checkpoints(save_dir)
    latest = read_latest(save_dir)
    keep = {path for _, path in checkpoints[-keep_last:]}
    if latest is not None:
        keep.add(save_dir / latest)
    if not keep:
        # No pointer and nothing selected: keep the newest so a complete checkpoint survives.
        keep = {path for _, path in checkpoints[-1:]}
    removed = []
    for _, path in checkpoints:
        if path not in keep:
            logger.info("retention (keep_last=%d): deleting %s", keep_last, path)
            remove_dir(path)
            removed.append(path)
    return removed
