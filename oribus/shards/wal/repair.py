"""Offline repair of a WAL that recovery refuses to open.

Recovery (``reader.py``) stops with ``DataCorrupted`` when the log is
damaged anywhere but a torn tail, because going on could silently drop
acknowledged records. ``repair_wal`` is the operator's deliberate choice to
keep everything before the damage and give up the rest:

1. Find the first invalid place in the whole log: a bad or out-of-sequence
   segment, a bad segment header, a frame that fails its checks, or an LSN
   that does not follow its predecessor.
2. If the damage is inside a segment, copy that segment to
   ``<name>.broken`` (fsynced) and truncate the original right after its last
   intact record. If not even the segment header can be kept, move the whole
   file to ``<name>.broken``.
3. Move every later segment to ``<name>.broken``: its records no longer
   follow on from the truncated log.

Nothing is deleted; ``.broken`` files are ignored by the WAL and can be
examined or removed by hand. Run it only while the shard is stopped. An
intact log is left untouched and yields no actions.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from oribus.shards.wal.reader import scan_log
from oribus.shards.wal.segment import fsync_directory, list_segments

BROKEN_SUFFIX = ".broken"


def repair_wal(directory: str | os.PathLike) -> list[str]:
    """Cut the log in ``directory`` back to its last intact record before the first damage.

    Returns human-readable descriptions of what was done (empty when the
    log was intact).
    """
    directory = Path(directory)
    segments = list_segments(directory)
    result = scan_log(segments, verify_bodies=True)
    damage = result.damage
    if damage is None:
        return []

    actions = []
    path = damage.segment.path
    found = f"{damage.reason} at byte offset {damage.offset}"
    if damage.whole_segment:
        backup = _move_aside(path)
        actions.append(f"moved {path.name} to {backup.name}: {found}")
    else:
        backup = _free_backup_name(path)
        shutil.copyfile(path, backup)
        _fsync_file(backup)
        actions.append(f"copied {path.name} to {backup.name} before truncating it")
        fd = os.open(path, os.O_RDWR)
        try:
            removed = os.fstat(fd).st_size - damage.offset
            os.ftruncate(fd, damage.offset)
            os.fsync(fd)
        finally:
            os.close(fd)
        actions.append(
            f"truncated {path.name} at byte offset {damage.offset} ({found}); "
            f"removed {removed} bytes, the log now ends at LSN {result.last_lsn}"
        )
    later = segments[segments.index(damage.segment) + 1 :]
    for segment in later:
        backup = _move_aside(segment.path)
        actions.append(f"moved {segment.path.name} to {backup.name}: it follows the damage")
    fsync_directory(directory)
    return actions


def _free_backup_name(path: Path) -> Path:
    """``<name>.broken``, or ``<name>.broken.N`` if earlier repairs left one."""
    candidate = path.with_name(path.name + BROKEN_SUFFIX)
    n = 1
    while candidate.exists():
        candidate = path.with_name(f"{path.name}{BROKEN_SUFFIX}.{n}")
        n += 1
    return candidate


def _move_aside(path: Path) -> Path:
    backup = _free_backup_name(path)
    os.rename(path, backup)
    return backup


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
