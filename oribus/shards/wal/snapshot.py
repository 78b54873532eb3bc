"""Shard snapshots: the whole state at one LSN, so the log before it can go.

A snapshot is one file, ``snapshot-{lsn:016x}.snap``, holding the shard
state after applying every record up to and including ``lsn``. Recovery
loads the latest snapshot and replays the WAL from ``lsn + 1``
(``Wal.open(..., replay_from_lsn=lsn + 1)``); the shard may then call
``Wal.remove_segments_before(lsn + 1)``.

File layout, little-endian::

    offset  size  field
         0     8  magic b"ORISNAP1"
         8     8  LSN (u64), the last record the state includes
        16     8  body length N (u64)
        24     4  CRC-32C (u32) of the body
        28     N  body: msgpack (bin type on) of the state

Writing is atomic: the file is written as ``<name>.tmp``, fsynced, renamed
to its final name and the directory fsynced; only then are older snapshots
deleted. A crash at any point leaves either the previous snapshot or the new
one under a final name, plus at most a temp file, which
``load_latest_snapshot`` deletes. Failpoints ``snapshot.before_rename`` and
``snapshot.after_rename`` sit on either side of the rename.

A latest snapshot that fails its checks raises ``DataCorrupted`` naming the
file: silently falling back to an older snapshot would need log segments
that may already have been removed.
"""

from __future__ import annotations

import os
import re
import struct
from pathlib import Path
from typing import Any

import msgpack
from crc32c import crc32c

from oribus.errors import DataCorrupted
from oribus.failpoints import failpoint
from oribus.shards.wal.segment import fsync_directory, write_all

SNAPSHOT_MAGIC = b"ORISNAP1"

SNAPSHOT_HEADER = struct.Struct(
    "<"
    "8s"  # magic b"ORISNAP1"
    "Q"  # LSN of the last record the state includes
    "Q"  # body length N
    "I"  # CRC-32C of the body
)
SNAPSHOT_HEADER_SIZE = SNAPSHOT_HEADER.size  # 28

TEMP_SUFFIX = ".tmp"
_NAME = re.compile(r"^snapshot-([0-9a-f]{16})\.snap$")


def snapshot_name(lsn: int) -> str:
    return f"snapshot-{lsn:016x}.snap"


def write_snapshot(directory: str | os.PathLike, lsn: int, state: Any) -> Path:
    """Write ``state`` as the snapshot at ``lsn``, atomically; returns its path.

    Older snapshots are deleted once the new one is durable.
    """
    if lsn < 0:
        raise ValueError(f"snapshot LSN must be >= 0, got {lsn}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    body = msgpack.packb(state, use_bin_type=True)
    header = SNAPSHOT_HEADER.pack(SNAPSHOT_MAGIC, lsn, len(body), crc32c(body))
    path = directory / snapshot_name(lsn)
    temp = path.with_name(path.name + TEMP_SUFFIX)
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        write_all(fd, header)
        write_all(fd, body)
        os.fsync(fd)
    finally:
        os.close(fd)
    failpoint("snapshot.before_rename")
    os.replace(temp, path)
    failpoint("snapshot.after_rename")
    fsync_directory(directory)
    # Deleting older snapshots need not be durable: if one comes back after
    # a crash, the newer one still wins and the next write removes it again.
    for older_lsn, older in _list_snapshots(directory):
        if older_lsn < lsn:
            older.unlink(missing_ok=True)
    return path


def load_latest_snapshot(directory: str | os.PathLike) -> tuple[int, Any] | None:
    """``(lsn, state)`` of the newest snapshot in ``directory``, or None if there is none.

    Leftover temp files of interrupted writes are deleted. Raises
    ``DataCorrupted`` naming the file if the newest snapshot is damaged.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return None
    for entry in os.scandir(directory):
        if entry.name.endswith(".snap" + TEMP_SUFFIX):
            os.unlink(entry.path)
    snapshots = _list_snapshots(directory)
    if not snapshots:
        return None
    lsn, path = snapshots[-1]
    return lsn, _read_snapshot(path, lsn)


def latest_snapshot_lsn(directory: str | os.PathLike) -> int | None:
    """The LSN of the newest snapshot file in ``directory`` (not read), None if there is none."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    snapshots = _list_snapshots(directory)
    return snapshots[-1][0] if snapshots else None


def _list_snapshots(directory: Path) -> list[tuple[int, Path]]:
    found = []
    for entry in os.scandir(directory):
        m = _NAME.match(entry.name)
        if m is not None:
            found.append((int(m.group(1), 16), Path(entry.path)))
    found.sort()
    return found


def latest_snapshot_file(directory: str | os.PathLike) -> tuple[int, bytes] | None:
    """``(lsn, the file's bytes)`` of the newest snapshot (not checked), None if there is none:
    what a replica group's primary sends a member that needs records it no longer keeps."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    snapshots = _list_snapshots(directory)
    if not snapshots:
        return None
    lsn, path = snapshots[-1]
    return lsn, path.read_bytes()


def decode_snapshot_file(data: bytes, lsn: int, where: str = "received snapshot") -> Any:
    """The state in a snapshot file's bytes, checked as ``load_latest_snapshot`` checks a
    file (magic, LSN, length, CRC); ``DataCorrupted`` naming ``where`` otherwise."""
    return _decode(data, lsn, where)


def _read_snapshot(path: Path, lsn: int) -> Any:
    return _decode(path.read_bytes(), lsn, str(path))


def _decode(data: bytes, lsn: int, path: str) -> Any:
    def damaged(reason: str, offset: int) -> DataCorrupted:
        return DataCorrupted(
            f"snapshot corrupted: {reason} in {path} at byte offset {offset}",
            path=path,
            offset=offset,
            reason=reason,
        )

    if len(data) < SNAPSHOT_HEADER_SIZE:
        raise damaged(f"header cut short ({len(data)} of {SNAPSHOT_HEADER_SIZE} bytes)", 0)
    magic, header_lsn, length, crc = SNAPSHOT_HEADER.unpack_from(data, 0)
    if magic != SNAPSHOT_MAGIC:
        raise damaged(f"bad magic {magic!r}", 0)
    if header_lsn != lsn:
        raise damaged(f"header says LSN {header_lsn}, file name says {lsn}", 8)
    if length != len(data) - SNAPSHOT_HEADER_SIZE:
        raise damaged(
            f"body length {length} but {len(data) - SNAPSHOT_HEADER_SIZE} bytes follow the header",
            16,
        )
    body = memoryview(data)[SNAPSHOT_HEADER_SIZE:]
    if crc32c(body) != crc:
        raise damaged("CRC mismatch", SNAPSHOT_HEADER_SIZE)
    try:
        return msgpack.unpackb(body, raw=False, strict_map_key=False)
    except Exception as e:  # msgpack raises several unrelated types
        raise damaged(f"body does not decode: {e}", SNAPSHOT_HEADER_SIZE) from e
