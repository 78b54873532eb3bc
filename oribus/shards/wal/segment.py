"""WAL segment files: naming, the segment header, listing and creation.

A shard's log is a directory of segment files, each holding a run of
consecutive records (frames as drawn in ``record.py``)::

    <wal dir>/
        0000000000000000-0000000000000001.wal      seq 0, first LSN 1
        0000000000000001-00000000000004e3.wal      seq 1, first LSN 0x4e3
        0000000000000002-00000000000009c1.wal      seq 2, first LSN 0x9c1 (active)

The name is ``{seq:016x}-{first_lsn:016x}.wal``: ``seq`` counts segments
(+1 per new segment, never reused, so names sort by position in the log)
and ``first_lsn`` is the LSN of the first record the segment holds, or would
hold if it is still empty. Only the last segment is ever appended to.

Each segment starts with a 16-byte header, then frames back to back::

    offset  size  field
         0     8  magic b"ORIWAL01" (format name and version)
         8     8  first LSN (u64 LE), must equal the LSN in the file name

A new segment is written under a temporary name (``<name>.tmp``), its header
fsynced, then renamed into place and the directory fsynced, so a segment
file with a final name always has a complete header. A leftover ``.tmp``
file is a segment whose creation was interrupted; it holds no records and is
deleted on open.

Across segments, seq numbers must be consecutive and first LSNs may not go
down (``find_sequence_break``); that each segment starts exactly one after the
last record of the previous one is checked by the recovery scan, which is
the only place that knows where the previous segment really ends.
"""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

SEGMENT_MAGIC = b"ORIWAL01"

SEGMENT_HEADER = struct.Struct(
    "<"
    "8s"  # magic b"ORIWAL01"
    "Q"  # first LSN of the segment, same as in the file name
)
SEGMENT_HEADER_SIZE = SEGMENT_HEADER.size  # 16

SEGMENT_SUFFIX = ".wal"
TEMP_SUFFIX = ".tmp"
_NAME = re.compile(r"^([0-9a-f]{16})-([0-9a-f]{16})\.wal$")


@dataclass(frozen=True, order=True)
class Segment:
    """One segment file, as described by its name."""

    seq: int  # position in the log; consecutive across segments
    first_lsn: int  # LSN of the first record in the file
    path: Path

    @property
    def name(self) -> str:
        return self.path.name


def segment_name(seq: int, first_lsn: int) -> str:
    """The file name of segment ``seq`` whose first record is ``first_lsn``."""
    return f"{seq:016x}-{first_lsn:016x}{SEGMENT_SUFFIX}"


def parse_segment_name(name: str) -> tuple[int, int] | None:
    """``(seq, first_lsn)`` for a segment file name, None for any other name."""
    m = _NAME.match(name)
    if m is None:
        return None
    return int(m.group(1), 16), int(m.group(2), 16)


def list_segments(directory: str | os.PathLike) -> list[Segment]:
    """Every segment file in ``directory``, in log order (by seq).

    Files with other names (temporaries, ``.broken`` copies, snapshots) are
    ignored. A missing directory holds no segments.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    segments = []
    for entry in os.scandir(directory):
        parsed = parse_segment_name(entry.name)
        if parsed is not None and entry.is_file():
            segments.append(Segment(parsed[0], parsed[1], Path(entry.path)))
    segments.sort()
    return segments


def find_sequence_break(segments: list[Segment]) -> tuple[int, str] | None:
    """The first segment that does not follow its predecessor, as ``(index, reason)``.

    Seq numbers must be consecutive (a gap means a segment file was lost)
    and first LSNs must not go down (two segments claiming the same records).
    None when the sequence is sound.
    """
    for i in range(1, len(segments)):
        prev, cur = segments[i - 1], segments[i]
        if cur.seq != prev.seq + 1:
            return i, f"segment seq {cur.seq} follows seq {prev.seq} (a segment is missing)"
        if cur.first_lsn < prev.first_lsn:
            return i, (
                f"segment first LSN {cur.first_lsn} is below the previous "
                f"segment's first LSN {prev.first_lsn}"
            )
    return None


def encode_segment_header(first_lsn: int) -> bytes:
    return SEGMENT_HEADER.pack(SEGMENT_MAGIC, first_lsn)


def segment_header_problem(data: bytes, segment: Segment) -> str | None:
    """Why the header at the start of ``data`` is not valid for ``segment`` (None if it is)."""
    if len(data) < SEGMENT_HEADER_SIZE:
        return f"segment header cut short ({len(data)} of {SEGMENT_HEADER_SIZE} bytes)"
    magic, first_lsn = SEGMENT_HEADER.unpack_from(data, 0)
    if magic != SEGMENT_MAGIC:
        return f"bad segment magic {magic!r}"
    if first_lsn != segment.first_lsn:
        return f"segment header says first LSN {first_lsn}, file name says {segment.first_lsn}"
    return None


def fsync_directory(directory: str | os.PathLike) -> None:
    """fsync a directory so that creations, renames and deletions in it are durable."""
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes | memoryview) -> None:
    """os.write until every byte is written (a regular file may take less per call)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def create_segment(
    directory: str | os.PathLike, seq: int, first_lsn: int, *, fsync: bool = True
) -> Segment:
    """Create an empty segment atomically: temp file, header, fsync, rename, fsync dir.

    With ``fsync=False`` (``unsafe_no_fsync``) the fsyncs are skipped but the
    rename still guarantees a complete header under the final name.
    """
    directory = Path(directory)
    path = directory / segment_name(seq, first_lsn)
    temp = path.with_name(path.name + TEMP_SUFFIX)
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        write_all(fd, encode_segment_header(first_lsn))
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temp, path)
    if fsync:
        fsync_directory(directory)
    return Segment(seq, first_lsn, path)


def remove_temp_segments(directory: str | os.PathLike) -> list[Path]:
    """Delete segment files whose creation was interrupted; returns what was removed."""
    directory = Path(directory)
    removed = []
    for entry in os.scandir(directory):
        name = entry.name
        if name.endswith(SEGMENT_SUFFIX + TEMP_SUFFIX) and parse_segment_name(
            name[: -len(TEMP_SUFFIX)]
        ):
            os.unlink(entry.path)
            removed.append(Path(entry.path))
    return removed
