"""Offline repair of a WAL that recovery refuses to open.

Recovery (``reader.py``) stops with ``DataCorrupted`` when the log is
damaged anywhere but a torn tail, because going on could silently drop
acknowledged records. ``repair_wal`` is the operator's deliberate choice to
keep every record the checks still prove and give up the rest:

1. Find the first invalid place in the whole log: a bad or out-of-sequence
   segment, a bad segment header, a frame that fails its checks, or an LSN
   that does not follow its predecessor.
2. A damaged segment *header* loses nothing when the segment can vouch for
   itself: its file name gives its first LSN, that LSN follows the previous
   segment, and the first frame after the header is intact and carries it
   (or there is no frame at all). The file is copied to ``<name>.broken``
   and the header rewritten in place; the scan then goes on.
3. Otherwise, if the damage is inside a segment, copy that segment to
   ``<name>.broken`` (fsynced) and truncate the original right after its last
   intact record. If not even the segment header can be kept, move the whole
   file to ``<name>.broken``.
4. Move every later segment to ``<name>.broken``: its records no longer
   follow on from the truncated log.

Before cutting, the bytes given up are searched for intact frames (a frame
is found by its LSN and proven by its CRC), so the report can say which
records were dropped: ``WalRepair.dropped`` counts every LSN past the new
end of the log up to the highest one found, and ``WalRepair.unreadable``
lists the records among them whose frames were destroyed.

Nothing is deleted; ``.broken`` files are ignored by the WAL and can be
examined or removed by hand. Run it only while the shard is stopped. An
intact log is left untouched and yields no actions.
"""

from __future__ import annotations

import os
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from oribus.shards.wal.reader import ScanResult, scan_log
from oribus.shards.wal.record import LSN_FIELD_OFFSET, FrameStatus, decode_record, iter_records
from oribus.shards.wal.segment import (
    SEGMENT_HEADER_SIZE,
    Segment,
    encode_segment_header,
    fsync_directory,
    list_segments,
    segment_header_problem,
)

BROKEN_SUFFIX = ".broken"

# How many consecutive LSNs past the last intact record are looked for in damaged bytes:
# a flipped byte destroys one frame, a zeroed disk block a few dozen small ones.
SALVAGE_LSN_REACH = 256

_LSN = struct.Struct("<Q")


@dataclass(frozen=True)
class DroppedRecord:
    """An intact record found in the part of the log that repair gave up."""

    lsn: int
    rtype: int
    body: Any


@dataclass
class WalRepair:
    """What ``repair_wal`` found and did."""

    actions: list[str] = field(default_factory=list)  # human-readable, in order; empty: intact
    kept: int = 0  # records the log holds after the repair
    last_lsn: int = 0  # the log ends at this LSN (0: holds none)
    dropped: int = 0  # records given up: LSNs past last_lsn up to the highest one found
    found: list[DroppedRecord] = field(default_factory=list)  # the dropped records still readable

    @property
    def unreadable(self) -> list[int]:
        """LSNs of dropped records whose frames are destroyed (their content is unknown)."""
        readable = {r.lsn for r in self.found}
        return [lsn for lsn in range(self.last_lsn + 1, self.last_lsn + self.dropped + 1)
                if lsn not in readable]


def repair_wal(directory: str | os.PathLike) -> WalRepair:
    """Cut the log in ``directory`` back to its last provably intact record.

    Returns what was kept, what was dropped and the actions taken (none when
    the log was intact).
    """
    directory = Path(directory)
    segments = list_segments(directory)
    report = WalRepair()
    while True:
        result = scan_log(segments, verify_bodies=True)
        damage = result.damage
        if damage is None:
            _count_kept(report, segments, result)
            return report
        if damage.offset == 0 and _header_is_recoverable(damage.segment, result.last_lsn + 1):
            report.actions.append(_rewrite_header(damage.segment, damage.reason))
            continue
        break

    _count_kept(report, segments, result)
    later = segments[segments.index(damage.segment) + 1 :]
    _find_dropped(report, damage.segment, max(damage.offset, SEGMENT_HEADER_SIZE), later)

    path = damage.segment.path
    found = f"{damage.reason} at byte offset {damage.offset}"
    if damage.whole_segment:
        backup = _move_aside(path)
        report.actions.append(f"moved {path.name} to {backup.name}: {found}")
    else:
        backup = _free_backup_name(path)
        shutil.copyfile(path, backup)
        _fsync_file(backup)
        report.actions.append(f"copied {path.name} to {backup.name} before truncating it")
        fd = os.open(path, os.O_RDWR)
        try:
            removed = os.fstat(fd).st_size - damage.offset
            os.ftruncate(fd, damage.offset)
            os.fsync(fd)
        finally:
            os.close(fd)
        report.actions.append(
            f"truncated {path.name} at byte offset {damage.offset} ({found}); "
            f"removed {removed} bytes, the log now ends at LSN {result.last_lsn}"
        )
    for segment in later:
        backup = _move_aside(segment.path)
        report.actions.append(f"moved {segment.path.name} to {backup.name}: it follows the damage")
    fsync_directory(directory)
    return report


def _count_kept(report: WalRepair, segments: list[Segment], result: ScanResult) -> None:
    # LSNs run consecutively from the first segment's first LSN to the last intact record.
    report.last_lsn = result.last_lsn
    report.kept = max(0, result.last_lsn - segments[0].first_lsn + 1) if segments else 0


def _header_is_recoverable(segment: Segment, expected_lsn: int) -> bool:
    """Whether a segment whose header is damaged still proves where it starts."""
    data = segment.path.read_bytes()
    if len(data) < SEGMENT_HEADER_SIZE or segment_header_problem(data, segment) is None:
        return False  # cut short, or the damage is elsewhere (a missing or misplaced segment)
    if segment.first_lsn != expected_lsn:
        return False
    if len(data) == SEGMENT_HEADER_SIZE:
        return True  # an empty segment: its name is all there is to trust
    frame = decode_record(data, SEGMENT_HEADER_SIZE, decode_body=False)
    return frame.status is FrameStatus.OK and frame.lsn == segment.first_lsn


def _rewrite_header(segment: Segment, reason: str) -> str:
    path = segment.path
    backup = _free_backup_name(path)
    shutil.copyfile(path, backup)
    _fsync_file(backup)
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, encode_segment_header(segment.first_lsn), 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    return (
        f"rewrote the header of {path.name} ({reason}): its name and its first record agree it "
        f"starts at LSN {segment.first_lsn}; the damaged file is kept as {backup.name}"
    )


def _find_dropped(report: WalRepair, damaged: Segment, offset: int, later: list[Segment]) -> None:
    """Record the intact frames in the bytes given up: the damaged segment from ``offset``
    on, then every later segment."""
    next_lsn = report.last_lsn + 1
    highest = report.last_lsn
    for segment in [damaged, *later]:
        data = segment.path.read_bytes()
        start = offset if segment is damaged else SEGMENT_HEADER_SIZE
        if start > SEGMENT_HEADER_SIZE:  # records of this segment were kept: it goes on from them
            from_lsn = next_lsn
        else:
            # a segment given up whole: its name says which LSNs it started with (a missing
            # segment before it took the ones in between)
            from_lsn = max(next_lsn, segment.first_lsn)
        # the segment's name says the records before it existed; its bytes held at least one
        highest = max(highest, segment.first_lsn - 1, from_lsn if len(data) > start else 0)
        for record in _salvage(data, start, from_lsn):
            report.found.append(record)
            next_lsn = record.lsn + 1
            highest = max(highest, record.lsn)
    report.dropped = highest - report.last_lsn


def _salvage(data: bytes, offset: int, from_lsn: int) -> list[DroppedRecord]:
    """Intact frames at or after ``offset`` whose LSNs are ``from_lsn`` or later, in order.

    Runs of intact frames are walked as recovery walks them; between runs the next
    frame is found by searching for its LSN's 8 bytes (within ``SALVAGE_LSN_REACH``
    LSNs) and proven by its CRC.
    """
    found: list[DroppedRecord] = []
    while True:
        start = _next_intact_frame(data, offset, from_lsn)
        if start is None:
            return found
        offset = start + 1  # past a run that yields nothing, search on after its start
        for lsn, rtype, body, end in iter_records(data, start):
            if lsn < from_lsn:
                break
            found.append(DroppedRecord(lsn, rtype, body))
            from_lsn = lsn + 1
            offset = end


def _next_intact_frame(data: bytes, offset: int, from_lsn: int) -> int | None:
    for lsn in range(from_lsn, from_lsn + SALVAGE_LSN_REACH):
        needle = _LSN.pack(lsn)
        hit = data.find(needle, offset + LSN_FIELD_OFFSET)
        while hit != -1:
            frame = decode_record(data, hit - LSN_FIELD_OFFSET)
            if frame.status is FrameStatus.OK:
                return frame.offset
            hit = data.find(needle, hit + 1)
    return None


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
