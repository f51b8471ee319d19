"""Read the history rows back from a wandb offline run file (``offline-run-*/run-*.wandb``).

The file is wandb's transaction log: a 7-byte header (``:W&B``, magic 0xBEE1, version 0) and then
LevelDB-log framing: 32 KiB blocks of records, each ``crc32 (4) | length (2) | type (1) | data``,
where a type of FULL holds a whole record and FIRST / MIDDLE / LAST hold the pieces of one that
spans blocks; the CRC-32 (IEEE) covers the type byte and the data. Each record is a
``wandb_internal_pb2.Record`` protobuf; ``history`` records carry the logged rows. This lets a
user (and the tests) check an offline run before ``wandb sync`` uploads it.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path
from typing import Any

_HEADER = b":W&B" + struct.pack("<H", 0xBEE1) + b"\x00"
_BLOCK = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


class WandbFileError(ValueError):
    """The file is not a readable wandb transaction log."""


def iter_records(path: str | Path) -> list[bytes]:
    """The raw protobuf payloads in ``path``, in order; raises WandbFileError on corruption."""
    data = Path(path).read_bytes()
    if not data.startswith(_HEADER):
        raise WandbFileError(f"{path}: not a wandb transaction log (bad header)")
    payloads, pending = [], b""
    offset = len(_HEADER)
    while offset + 7 <= len(data):
        left_in_block = _BLOCK - offset % _BLOCK
        if left_in_block < 7:  # the writer zero-pads a block tail too short for a header
            offset += left_in_block
            continue
        checksum, length, kind = struct.unpack_from("<IHB", data, offset)
        if kind == 0 and length == 0:
            offset += left_in_block
            continue
        body = data[offset + 7 : offset + 7 + length]
        if len(body) < length:
            break  # a partial record at the end of a file that is still being written
        if zlib.crc32(bytes([kind]) + body) & 0xFFFFFFFF != checksum:
            raise WandbFileError(f"{path}: checksum mismatch at byte {offset}")
        offset += 7 + length
        if kind == _FULL:
            payloads.append(body)
        elif kind == _FIRST:
            pending = body
        elif kind == _MIDDLE:
            pending += body
        elif kind == _LAST:
            payloads.append(pending + body)
            pending = b""
        else:
            raise WandbFileError(f"{path}: unknown record type {kind} at byte {offset}")
    return payloads


def read_history(path: str | Path) -> list[dict[str, Any]]:
    """The logged rows of an offline run file, each a dict of key -> value (``_step`` included)."""
    from wandb.proto import wandb_internal_pb2

    rows = []
    for payload in iter_records(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        if record.WhichOneof("record_type") != "history":
            continue
        row: dict[str, Any] = {}
        for item in record.history.item:
            key = item.key or "/".join(item.nested_key)
            row[key] = json.loads(item.value_json) if item.value_json else None
        rows.append(row)
    return rows


def find_run_file(run_dir: str | Path) -> Path:
    """The newest ``run-*.wandb`` under ``<run_dir>/wandb``."""
    files = sorted(Path(run_dir).glob("wandb/*run-*/run-*.wandb"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise FileNotFoundError(f"no wandb run file under {Path(run_dir) / 'wandb'}")
    return files[-1]
