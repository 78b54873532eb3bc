"""The recovery scan: read a shard's log back and decide whether it can be trusted.

The scan walks the segments in order (``segment.py``), checks each segment
header, then every frame (``record.py``): its CRC, and that LSNs run
strictly consecutively, +1 per record, across the whole log. Records at or
above ``replay_from_lsn`` are handed to the caller in order. It ends in one
of three ways:

1. **Clean end.** Every segment ends exactly after its last intact record.

2. **Torn tail.** The process or machine stopped in the middle of a write,
   so the end of the *last* segment holds part of a batch that was never
   acknowledged (acknowledgement waits for fsync). The first invalid frame
   is a torn tail when it is in the last segment and

   - it is cut short by the end of the file, or
   - it is bad (e.g. CRC mismatch) and nothing but zero bytes follows it
     (filesystems can extend a file before the data reaches the disk, which
     reads back as zeros), or it runs exactly to the end of the file,

   and no intact record with the next LSN appears anywhere after it. (That
   last guard turns a damaged length field, which can make a record in the
   middle of the segment look like it runs past EOF, into the corruption it
   is instead of silently cutting off the acknowledged records after it.)
   The file is truncated to the end of the last intact record and fsynced, a
   warning is logged on the ``oribus.wal`` logger, and recovery goes on.

3. **Corruption.** Anything else: an invalid frame in a segment that is not
   the last one, an invalid frame in the last segment followed by non-zero
   bytes or by the next record, a bad segment header, a missing segment, or
   an LSN that is not the previous one + 1. Acknowledged data may be lost,
   so the scan refuses to go on: ``DataCorrupted`` names the file and byte
   offset (also in ``details["path"]`` and ``details["offset"]``). Nothing
   is modified; ``repair.repair_wal`` is the offline way forward.

Segments whose records all lie below ``replay_from_lsn`` (covered by a
snapshot) are not read at all, which keeps recovery time bounded by the
snapshot interval rather than by the age of the log.
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from oribus.errors import DataCorrupted
from oribus.shards.wal.record import (
    LSN_FIELD_OFFSET,
    Decoded,
    FrameStatus,
    decode_record,
    iter_records,
)
from oribus.shards.wal.segment import (
    SEGMENT_HEADER_SIZE,
    Segment,
    find_sequence_break,
    list_segments,
    segment_header_problem,
)

log = logging.getLogger("oribus.wal")

OnRecord = Callable[[int, int, Any], None]

_NEVER = 1 << 64  # an LSN above any real one: "decode no bodies"
_LSN = struct.Struct("<Q")


@dataclass(frozen=True)
class Damage:
    """The first place where the log stops being valid."""

    segment: Segment  # the segment holding the damage
    offset: int  # byte offset in that file; the last intact record ends here
    reason: str
    torn: bool  # True when this qualifies as a torn tail (outcome 2)

    @property
    def whole_segment(self) -> bool:
        """True when not even the segment header can be kept."""
        return self.offset < SEGMENT_HEADER_SIZE

    def to_error(self) -> DataCorrupted:
        return DataCorrupted(
            f"WAL corrupted: {self.reason} in {self.segment.path} at byte offset {self.offset}",
            path=str(self.segment.path),
            offset=self.offset,
            reason=self.reason,
        )


@dataclass
class ScanResult:
    """What a scan found."""

    segments: list[Segment]  # every segment in the directory, in log order
    last_lsn: int = 0  # LSN of the last intact record (0: none)
    replayed: int = 0  # records passed to on_record
    damage: Damage | None = None  # the first invalid place, if any
    truncated_bytes: int = 0  # bytes of torn tail removed by ``recover``
    # Segments not read because all their records are below replay_from_lsn.
    skipped: list[Segment] = field(default_factory=list)


def scan_log(
    segments: list[Segment],
    *,
    replay_from_lsn: int | None = None,
    on_record: OnRecord | None = None,
    verify_bodies: bool = False,
) -> ScanResult:
    """Scan ``segments`` without modifying anything; stop at the first damage.

    ``replay_from_lsn`` None scans the whole log; otherwise segments entirely
    below it are skipped and ``on_record(lsn, rtype, body)`` is called for
    every record at or above it. ``verify_bodies`` also unpacks the bodies of
    records nobody receives, so that an undecodable body counts as damage.
    """
    result = ScanResult(segments=list(segments))
    if not segments:
        return result
    replay_from = segments[0].first_lsn if replay_from_lsn is None else replay_from_lsn
    start = 0
    while start + 1 < len(segments) and segments[start + 1].first_lsn <= replay_from:
        start += 1
    result.skipped = segments[:start]

    first = segments[start]
    result.last_lsn = first.first_lsn - 1
    if first.first_lsn > replay_from:
        result.damage = Damage(
            first,
            0,
            f"log starts at LSN {first.first_lsn} but recovery needs LSN {replay_from}",
            torn=False,
        )
        return result

    decode_from = replay_from if on_record is not None else _NEVER
    if verify_bodies:
        decode_from = 0
    sequence_break = find_sequence_break(segments[start:])
    expected = first.first_lsn
    for index in range(start, len(segments)):
        segment = segments[index]
        if sequence_break is not None and index == start + sequence_break[0]:
            result.damage = Damage(segment, 0, sequence_break[1], torn=False)
            return result
        data = segment.path.read_bytes()
        problem = segment_header_problem(data, segment)
        if problem is None and segment.first_lsn != expected:
            problem = f"LSN gap: segment starts at LSN {segment.first_lsn}, expected {expected}"
        if problem is not None:
            result.damage = Damage(segment, 0, problem, torn=False)
            return result

        offset = SEGMENT_HEADER_SIZE
        for lsn, rtype, body, end in iter_records(data, offset, decode_from_lsn=decode_from):
            if lsn != expected:
                result.damage = Damage(
                    segment,
                    offset,
                    f"LSN gap: record has LSN {lsn}, expected {expected}",
                    torn=False,
                )
                return result
            if lsn >= replay_from and on_record is not None:
                on_record(lsn, rtype, body)
                result.replayed += 1
            result.last_lsn = lsn
            expected = lsn + 1
            offset = end
        if offset < len(data):
            frame = decode_record(data, offset)
            is_last = index == len(segments) - 1
            torn = is_last and _is_torn_tail(data, frame, expected + 1)
            result.damage = Damage(
                segment, offset, f"{frame.status.value} record: {frame.reason}", torn
            )
            return result
    return result


def recover(
    directory: str | os.PathLike,
    *,
    replay_from_lsn: int = 1,
    on_record: OnRecord | None = None,
    fsync: bool = True,
) -> ScanResult:
    """Run the recovery scan over ``directory`` and cut off a torn tail.

    Calls ``on_record(lsn, rtype, body)`` for every intact record with
    ``lsn >= replay_from_lsn``, in order. A torn tail is truncated (and the
    file fsynced unless ``fsync`` is False); any other damage raises
    ``DataCorrupted`` before anything is modified.
    """
    result = scan_log(
        list_segments(directory), replay_from_lsn=replay_from_lsn, on_record=on_record
    )
    damage = result.damage
    if damage is None:
        return result
    if not damage.torn:
        raise damage.to_error()
    result.truncated_bytes = _truncate(damage.segment.path, damage.offset, fsync=fsync)
    log.warning(
        "WAL torn tail in %s at byte offset %d (%s): truncated %d bytes after LSN %d",
        damage.segment.path,
        damage.offset,
        damage.reason,
        result.truncated_bytes,
        result.last_lsn,
    )
    return result


def _is_torn_tail(data: bytes, frame: Decoded, next_lsn: int) -> bool:
    """Whether an invalid frame at the end of the last segment is a torn write."""
    if frame.status is FrameStatus.BAD:
        tail = frame.offset if frame.end is None else frame.end
        if data.count(0, tail) != len(data) - tail:
            return False
    return not _intact_record_after(data, frame.offset, next_lsn)


def _intact_record_after(data: bytes, start: int, lsn: int) -> bool:
    """Whether an intact frame carrying ``lsn`` begins anywhere after ``start``.

    Searches for the 8 LSN bytes with ``bytes.find`` and checks the frame
    around each hit, so the cost is one pass at C speed.
    """
    needle = _LSN.pack(lsn)
    hit = data.find(needle, start + 1 + LSN_FIELD_OFFSET)
    while hit != -1:
        frame = decode_record(data, hit - LSN_FIELD_OFFSET, decode_body=False)
        if frame.status is FrameStatus.OK:
            return True
        hit = data.find(needle, hit + 1)
    return False


def _truncate(path: Path, size: int, *, fsync: bool) -> int:
    """Truncate ``path`` to ``size`` bytes; returns how many bytes were removed."""
    fd = os.open(path, os.O_RDWR)
    try:
        removed = os.fstat(fd).st_size - size
        os.ftruncate(fd, size)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
    return removed
