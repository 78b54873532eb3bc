"""What a primary sends a learner that lacks records it no longer keeps (specs/replication.md §7).

The ``data`` of the ``SnapshotChunk``s, concatenated, is one of::

    a snapshot file, byte for byte            (oribus/shards/wal/snapshot.py: "ORISNAP1" ...)
    "ORICATC1" | u64 snapshot file length, big-endian | the snapshot file | the history file

The second form comes from a primary whose shard keeps its older versions in an
on-disk history store (``history_store="lmdb"``, specs/engine.md "History store"):
its snapshots hold only current versions, so the learner needs the engine's
versions too. The history file is LMDB's consistent copy
(``LmdbHistory.copy_file``), taken *after* the snapshot file was read: the
engine was synced before that snapshot was written, so the copy holds every
version the snapshot's records replaced, and perhaps later ones (written again,
the same bytes, when the learner applies the log after the snapshot). The two
magics differ in their fourth byte, so neither form is taken for the other.

The snapshot file keeps its own CRC; the history file has no checksum of its
own (LMDB keeps none; it checks its meta pages when the learner opens it), so
it relies on the transport's (TCP's, or TLS's when the group uses it): adding
a CRC per chunk is still to do. The snapshot file travels in memory, as it always did;
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

from oribus.errors import DataCorrupted

CATCHUP_MAGIC = b"ORICATC1"
_HEADER = struct.Struct(">8sQ")  # magic | u64 length of the snapshot file that follows


def pack_catchup(snapshot_file: bytes, history_file: bytes | None) -> bytes:
    """The whole frame in memory (what ``CatchupSource`` reads out piece by piece)."""
    if history_file is None:
        return snapshot_file
    return _HEADER.pack(CATCHUP_MAGIC, len(snapshot_file)) + snapshot_file + history_file


class CatchupData(Protocol):
    """What a primary's snapshot source gives: ``len`` and slices, read as they are sent."""

    def __len__(self) -> int: ...

    def __getitem__(self, piece: slice) -> bytes: ...


class CatchupSource:
    """The second form, read piece by piece: the header and the snapshot file from memory, the
    history file from ``history`` (an open file, typically unlinked, closed by ``close``)."""

    def __init__(self, snapshot_file: bytes, history: BinaryIO) -> None:
        self._head = _HEADER.pack(CATCHUP_MAGIC, len(snapshot_file)) + snapshot_file
        self._history = history
        self._history_len = os.fstat(history.fileno()).st_size

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

    @property
    def carries_history(self) -> bool:
        """The frame is of the second form (known once its header arrived)."""
        return self._snapshot_end is not None

    def feed(self, data: bytes) -> None:
        self.length += len(data)
        if self._file is not None:
            self._file.write(data)
            return
        self._head += data
        if self._snapshot_end is None:
            if len(self._head) < _HEADER.size or not self._head.startswith(CATCHUP_MAGIC):
                return  # a header still cut, or the first form: all of it stays here
            _, length = _HEADER.unpack_from(self._head)
            self._snapshot_end = _HEADER.size + length
        if len(self._head) > self._snapshot_end:
            self.spill.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.spill, "wb")  # noqa: SIM115 (kept open across chunks, closed by finish/discard)
            self._file.write(self._head[self._snapshot_end:])
            del self._head[self._snapshot_end:]

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

