"""What a primary sends a learner that lacks records it no longer keeps (specs/replication.md §7).

The ``data`` of the ``SnapshotChunk``s, concatenated, is one of::

    a snapshot file, byte for byte            (oribus/shards/wal/snapshot.py: "ORISNAP1" ...)
    "ORICATC1" | u64 snapshot file length | u64 history file length | u32 CRC-32C of the
               history file | the snapshot file | the history file       (integers big-endian)

The second form comes from a primary whose shard keeps its older versions in an
on-disk history store (``history_store="lmdb"``, specs/engine.md "History store"):
its snapshots hold only current versions, so the learner needs the engine's
versions too. The history file is LMDB's consistent copy
(``LmdbHistory.copy_file``), taken *after* the snapshot file was read: the
engine was synced before that snapshot was written, so the copy holds every
version the snapshot's records replaced, and perhaps later ones (written again,
the same bytes, when the learner applies the log after the snapshot). The two
magics differ in their fourth byte, so neither form is taken for the other.

The snapshot file keeps its own CRC; LMDB keeps none in its file, so the frame
carries the history file's length and CRC-32C (the primary reads its copy
once to compute it), and the learner checks both before it puts the file in
place: a damaged or cut transfer is refused (``DataCorrupted``), and the
learner asks again. The snapshot file travels in memory, as it always did;
the history file, which may be many GB, never does: the primary's copy is an
unlinked temporary file read one chunk at a time (``CatchupSource``), and the
learner writes the chunks past the snapshot straight to a file beside its
engine (``CatchupReceiver``), which it then renames into place.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import BinaryIO, Protocol

from crc32c import crc32c

from oribus.errors import DataCorrupted

CATCHUP_MAGIC = b"ORICATC1"
_HEADER = struct.Struct(
    ">8s"  # magic
    "Q"  # length of the snapshot file
    "Q"  # length of the history file
    "I"  # CRC-32C of the history file
)
_READ = 1 << 20  # bytes read at a time to checksum the primary's copy


def pack_catchup(snapshot_file: bytes, history_file: bytes | None) -> bytes:
    """The whole frame in memory (what ``CatchupSource`` reads out piece by piece)."""
    if history_file is None:
        return snapshot_file
    return (_HEADER.pack(CATCHUP_MAGIC, len(snapshot_file), len(history_file), crc32c(history_file))
            + snapshot_file + history_file)


class CatchupData(Protocol):
    """What a primary's snapshot source gives: ``len`` and slices, read as they are sent."""

    def __len__(self) -> int: ...

    def __getitem__(self, piece: slice) -> bytes: ...


class CatchupSource:
    """The second form, read piece by piece: the header and the snapshot file from memory, the
    history file from ``history`` (an open file, typically unlinked, closed by ``close``)."""

    def __init__(self, snapshot_file: bytes, history: BinaryIO) -> None:
        """Reads ``history`` once, for its CRC (in the snapshot source's worker thread)."""
        self._history = history
        self._history_len = os.fstat(history.fileno()).st_size
        crc, at = 0, 0
        while at < self._history_len:
            piece = os.pread(history.fileno(), _READ, at)
            if not piece:
                break
            crc = crc32c(piece, crc)
            at += len(piece)
        self._head = _HEADER.pack(CATCHUP_MAGIC, len(snapshot_file), self._history_len, crc) + snapshot_file

    def __len__(self) -> int:
        return len(self._head) + self._history_len

    def __getitem__(self, piece: slice) -> bytes:
        start, stop, _ = piece.indices(len(self))
        out = self._head[start:stop]
        if stop > len(self._head):
            at = max(start, len(self._head)) - len(self._head)
            out += os.pread(self._history.fileno(), stop - len(self._head) - at, at)
        return out

    def close(self) -> None:
        self._history.close()


class CatchupReceiver:
    """A learner's side: chunks in order; the snapshot file kept in memory, the history file
    (if any) written to ``spill`` as it arrives. ``finish`` gives both; ``discard`` deletes
    the spill file (a transfer that restarts or is refused)."""

    def __init__(self, spill: Path) -> None:
        self.spill = Path(spill)
        self.length = 0  # bytes received
        self._head = bytearray()
        self._file: BinaryIO | None = None
        self._snapshot_end: int | None = None  # where the snapshot file ends in the frame
        self._history_len = 0  # as the header says
        self._history_crc = 0  # as the header says
        self._written = 0  # history bytes written to ``spill``
        self._crc = 0  # CRC-32C of those

    @property
    def carries_history(self) -> bool:
        """The frame is of the second form (known once its header arrived)."""
        return self._snapshot_end is not None

    def feed(self, data: bytes) -> None:
        self.length += len(data)
        if self._file is not None:
            self._spill(data)
            return
        self._head += data
        if self._snapshot_end is None:
            if len(self._head) < _HEADER.size or not self._head.startswith(CATCHUP_MAGIC):
                return  # a header still cut, or the first form: all of it stays here
            _, length, self._history_len, self._history_crc = _HEADER.unpack_from(self._head)
            self._snapshot_end = _HEADER.size + length
        if len(self._head) > self._snapshot_end:
            self.spill.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.spill, "wb")  # noqa: SIM115 (kept open across chunks, closed by finish/discard)
            self._spill(bytes(self._head[self._snapshot_end:]))
            del self._head[self._snapshot_end:]

    def _spill(self, data: bytes) -> None:
        assert self._file is not None
        self._file.write(data)
        self._written += len(data)
        self._crc = crc32c(data, self._crc)

    def finish(self, *, fsync: bool = True) -> tuple[bytes, Path | None]:
        """``(snapshot file, the history file's path or None)``, the history file fsynced."""
        head = bytes(self._head)
        if self._snapshot_end is None:
            if len(head) < _HEADER.size and CATCHUP_MAGIC.startswith(head[:len(CATCHUP_MAGIC)]):
                raise DataCorrupted("a catch-up frame is cut inside its header")
            return head, None
        if len(head) < self._snapshot_end:
            raise DataCorrupted(f"a catch-up frame names a snapshot of {self._snapshot_end - _HEADER.size} "
                                f"bytes; {len(head) - _HEADER.size} arrived")
        if self._file is None:  # an empty history file: no engine is no valid copy
            raise DataCorrupted("a catch-up frame without its history file")
        if self._written != self._history_len or self._crc != self._history_crc:
            raise DataCorrupted(f"a catch-up frame's history file arrived as {self._written} bytes of CRC-32C "
                                f"{self._crc:08x}; its header says {self._history_len} bytes of {self._history_crc:08x}")
        self._file.flush()
        if fsync:
            os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        return head[_HEADER.size:], self.spill

    def discard(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        try:
            os.unlink(self.spill)
        except FileNotFoundError:
            pass

