"""What a primary sends a learner that lacks records it no longer keeps (specs/replication.md §7).

The ``data`` of the ``SnapshotChunk``s, concatenated, is one of::

    a snapshot file, byte for byte            (oribus/shards/wal/snapshot.py: "ORISNAP1" ...)
    "ORICATC1" | u64 snapshot file length, big-endian | the snapshot file | the history file

The second form comes from a primary whose shard keeps its older versions in an
on-disk history store (``history_store="lmdb"``, specs/engine.md "History store"):
its snapshots hold only current versions, so the learner needs the engine's
versions too. The history file is LMDB's consistent copy
(``LmdbHistory.copy_bytes``), taken *after* the snapshot file was read: the
engine was synced before that snapshot was written, so the copy holds every
version the snapshot's records replaced, and perhaps later ones (written again,
the same bytes, when the learner applies the log after the snapshot). The two
magics differ in their first bytes, so neither form is taken for the other.

The snapshot file keeps its own CRC; the history file is checked by LMDB when
the learner opens it. (Both travel in memory, as the snapshot always did: a
history of many GB wants a stream from a file, which is not done yet.)
"""

from __future__ import annotations

import struct

from oribus.errors import DataCorrupted

CATCHUP_MAGIC = b"ORICATC1"
_HEADER = struct.Struct(">8sQ")  # magic | u64 length of the snapshot file that follows


def pack_catchup(snapshot_file: bytes, history_file: bytes | None) -> bytes:
    """The bytes a primary sends: the snapshot file alone, or both files."""
    if history_file is None:
        return snapshot_file
    return _HEADER.pack(CATCHUP_MAGIC, len(snapshot_file)) + snapshot_file + history_file


def unpack_catchup(data: bytes) -> tuple[bytes, bytes | None]:
    """``(snapshot file, history file or None)``; ``DataCorrupted`` if the frame is cut."""
    if not data.startswith(CATCHUP_MAGIC):
        return data, None
    if len(data) < _HEADER.size:
        raise DataCorrupted("a catch-up frame is cut inside its header")
    _, length = _HEADER.unpack_from(data)
    end = _HEADER.size + length
    if end > len(data):
        raise DataCorrupted(f"a catch-up frame names a snapshot of {length} bytes; {len(data) - _HEADER.size} arrived")
    return data[_HEADER.size:end], data[end:]
