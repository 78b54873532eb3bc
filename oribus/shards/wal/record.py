r"""The WAL record frame: how one record is laid out in a segment file.

Every record is a self-delimiting frame, little-endian throughout::

    offset  size  field
    ------  ----  -----------------------------------------------------------
         0     4  body length N (u32), bytes of msgpack body that follow
         4     4  CRC-32C (u32) of bytes 8 .. 17+N: record type, LSN and body
         8     1  record type (u8, 1..255; 0 never appears in a valid frame)
         9     8  LSN (u64, >= 1), log sequence number, +1 per record
        17     N  body: msgpack (bin type on), any msgpack-able value

     0       4       8   9            17                  17+N
     +-------+-------+---+------------+-------------------+
     |   N   |  CRC  | T |    LSN     |   body (N bytes)  |
     +-------+-------+---+------------+-------------------+
                     \________ covered by the CRC ________/

The CRC covers the type, the LSN and the body, which lie contiguously after
the CRC field, so it is computed over one slice of the frame. The length is
not covered; a damaged length is caught either by the CRC of the frame it
points to, by the 64 MiB sanity limit, or by running past the end of the file
(see ``reader.py`` for how a frame that runs past EOF is told apart from a
torn tail).

The WAL treats the record type as an opaque byte: the shard defines what the
types mean (``oribus.shards.txn.RecordType``: 1..5), with one exception kept
here because a replica group's log shipping depends on it:

    type 255  TERM_START  body {"t": term, "m": member id}

A replicated shard's primary appends it before it serves a new term
(``specs/replication.md`` §5): it is the first record of every term, so a
member knows the term of each record it holds from the ``TERM_START`` records
before it (``oribus.shards.replica.terms``). It changes no shard state; replay
skips it. An unreplicated shard never writes one. Type 0 is reserved so that a run of zero bytes (a torn write on a
filesystem that extended the file before writing the data) never decodes as
a record even in the astronomically unlikely case its CRC matched.

``decode_record`` reads one frame from a buffer and says which of three
things it found: an intact record (``OK``), a frame cut short by the end of
the buffer (``TRUNCATED``), or a frame that cannot be valid (``BAD``: CRC
mismatch, absurd length, reserved type or LSN, undecodable body).
``iter_records`` is the recovery fast path: it walks a run of intact frames
with no per-record objects beyond a tuple, and stops silently at the first
frame that is not intact, where ``decode_record`` then says why.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterator
from typing import Any, NamedTuple

import msgpack
from crc32c import crc32c

# The fixed part of a frame, in the order it appears on disk.
HEADER = struct.Struct(
    "<"
    "I"  # body length N, bytes of msgpack body after the header
    "I"  # CRC-32C over record type + LSN + body (bytes 8 .. 17+N of the frame)
    "B"  # record type, 1..255, opaque to the WAL
    "Q"  # LSN, >= 1, consecutive across the whole log
)
HEADER_SIZE = HEADER.size  # 17

# The two halves of the header, used when encoding: the CRC is computed over
# the type+LSN bytes followed by the body, then written in front of them.
_LENGTH_CRC = struct.Struct(
    "<"
    "I"  # body length N
    "I"  # CRC-32C of the rest of the frame
)
_TYPE_LSN = struct.Struct(
    "<"
    "B"  # record type
    "Q"  # LSN
)
CRC_START = _LENGTH_CRC.size  # 8: where the CRC-covered bytes begin
LSN_FIELD_OFFSET = CRC_START + 1  # 9: where the LSN sits in a frame

# A body longer than this is taken as a damaged length field rather than
# trusted to allocate memory. Records that large are refused when encoding.
MAX_BODY_BYTES = 64 << 20

MIN_RECORD_TYPE = 1
MAX_RECORD_TYPE = 255
TERM_START = 255  # the first record of a replicated shard's term (docstring above)


class FrameStatus(enum.Enum):
    """What ``decode_record`` found at an offset."""

    OK = "ok"  # an intact record
    TRUNCATED = "truncated"  # the buffer ends before the frame does
    BAD = "bad"  # the frame cannot be valid (see ``Decoded.reason``)


class Decoded(NamedTuple):
    """The result of decoding one frame.

    For ``OK`` every field is set. For ``TRUNCATED`` and ``BAD``, ``reason``
    explains the problem and ``end`` is where the frame claims to end, or
    None when not even the length is usable; ``rtype``, ``lsn`` are whatever
    the header held (0 when the header itself is cut short).
    """

    status: FrameStatus
    offset: int  # where the frame starts in the buffer
    end: int | None  # offset just past the frame (None: unknown)
    rtype: int
    lsn: int
    body: Any
    reason: str  # "" for OK


_OK = FrameStatus.OK
_TRUNCATED = FrameStatus.TRUNCATED
_BAD = FrameStatus.BAD
_unpack_header = HEADER.unpack_from
_unpackb = msgpack.unpackb


def encode_record(rtype: int, lsn: int, body: Any) -> bytes:
    """Encode one record as a complete frame.

    Raises ValueError for a reserved or out-of-range type, an LSN below 1 or
    a body over ``MAX_BODY_BYTES`` once packed.
    """
    if not MIN_RECORD_TYPE <= rtype <= MAX_RECORD_TYPE:
        raise ValueError(f"record type must be {MIN_RECORD_TYPE}..{MAX_RECORD_TYPE}, got {rtype}")
    if lsn < 1:
        raise ValueError(f"LSN must be >= 1, got {lsn}")
    payload = msgpack.packb(body, use_bin_type=True)
    if len(payload) > MAX_BODY_BYTES:
        raise ValueError(f"record body is {len(payload)} bytes, over the {MAX_BODY_BYTES} limit")
    covered = _TYPE_LSN.pack(rtype, lsn) + payload
    return _LENGTH_CRC.pack(len(payload), crc32c(covered)) + covered


def decode_record(buf: bytes, offset: int = 0, *, decode_body: bool = True) -> Decoded:
    """Decode the frame that starts at ``offset`` in ``buf``.

    With ``decode_body=False`` the CRC is still checked but the msgpack body
    is not unpacked (``body`` is None); recovery uses this to skip records a
    snapshot already covers.
    """
    size = len(buf)
    if size - offset < HEADER_SIZE:
        return Decoded(
            _TRUNCATED, offset, None, 0, 0, None, "frame header cut short by end of data"
        )
    length, crc, rtype, lsn = _unpack_header(buf, offset)
    if length > MAX_BODY_BYTES:
        return Decoded(_BAD, offset, None, rtype, lsn, None, f"absurd body length {length}")
    body_start = offset + HEADER_SIZE
    end = body_start + length
    if end > size:
        return Decoded(
            _TRUNCATED, offset, end, rtype, lsn, None, "frame body cut short by end of data"
        )
    if crc32c(buf[offset + CRC_START : end]) != crc:
        return Decoded(_BAD, offset, end, rtype, lsn, None, "CRC mismatch")
    if rtype == 0 or lsn == 0:
        return Decoded(_BAD, offset, end, rtype, lsn, None, "reserved record type or LSN 0")
    body = None
    if decode_body:
        try:
            body = _unpackb(buf[body_start:end], raw=False, strict_map_key=False)
        except Exception as e:  # msgpack raises several unrelated types
            return Decoded(_BAD, offset, end, rtype, lsn, None, f"body does not decode: {e}")
    return Decoded(_OK, offset, end, rtype, lsn, body, "")


def iter_records(
    buf: bytes, offset: int = 0, *, decode_from_lsn: int = 0
) -> Iterator[tuple[int, int, Any, int]]:
    """Yield ``(lsn, rtype, body, end)`` for each intact frame from ``offset`` on.

    Stops, without raising, at the end of ``buf`` or at the first frame that
    ``decode_record`` would not report as OK; the caller then decodes that
    offset with ``decode_record`` to learn why. Bodies of records whose LSN is
    below ``decode_from_lsn`` are CRC-checked but not unpacked (body None).

    This repeats the checks of ``decode_record`` inline because recovery
    speed is dominated by per-record overhead; the two must accept exactly
    the same frames (``tests/unit/test_wal_record.py`` checks that).
    """
    size = len(buf)
    unpack_header = _unpack_header
    unpackb = _unpackb
    while size - offset >= HEADER_SIZE:
        length, crc, rtype, lsn = unpack_header(buf, offset)
        end = offset + HEADER_SIZE + length
        if length > MAX_BODY_BYTES or end > size:
            return
        if crc32c(buf[offset + CRC_START : end]) != crc or rtype == 0 or lsn == 0:
            return
        body = None
        if lsn >= decode_from_lsn:
            try:
                body = unpackb(buf[offset + HEADER_SIZE : end], raw=False, strict_map_key=False)
            except Exception:
                return
        yield lsn, rtype, body, end
        offset = end


class Frame(NamedTuple):
    """One intact frame of a run of frames (``split_frames``)."""

    lsn: int
    rtype: int
    body: Any  # None when bodies were not decoded
    start: int  # offset of the frame in the buffer
    end: int  # offset just past it


def split_frames(buf: bytes, first_lsn: int, *, decode_bodies: bool = True) -> list[Frame]:
    """Check a run of frames received from elsewhere (a replica group's primary) and split it.

    Every frame must be intact (the checks of ``iter_records``, which recovery uses) and the
    LSNs must run ``first_lsn``, ``first_lsn + 1``, ... to the end of ``buf``, with nothing
    after the last frame; otherwise ``ValueError`` says what is wrong and where.
    """
    frames: list[Frame] = []
    expected = first_lsn
    offset = 0
    decode_from = 0 if decode_bodies else 1 << 64
    for lsn, rtype, body, end in iter_records(buf, 0, decode_from_lsn=decode_from):
        if lsn != expected:
            raise ValueError(f"frame at byte {offset} has LSN {lsn}, expected {expected}")
        frames.append(Frame(lsn, rtype, body, offset, end))
        expected = lsn + 1
        offset = end
    if offset != len(buf):
        bad = decode_record(buf, offset)
        raise ValueError(f"{bad.status.value} frame at byte {offset} (LSN {expected}): {bad.reason}")
    return frames


def frame_lsn(frame: bytes) -> int:
    """The LSN field of one encoded frame (not checked)."""
    return int(_LSN.unpack_from(frame, LSN_FIELD_OFFSET)[0])


_LSN = struct.Struct("<Q")
