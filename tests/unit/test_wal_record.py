"""The WAL record frame codec (oribus/shards/wal/record.py)."""

from __future__ import annotations

import struct

import msgpack
import pytest
from crc32c import crc32c

from oribus.shards.wal import record
from oribus.shards.wal.record import (
    HEADER_SIZE,
    FrameStatus,
    decode_record,
    encode_record,
    iter_records,
)

BODIES = [
    None,
    0,
    -1,
    2**63,
    "text",
    b"\x00\xff" * 50,
    [1, "two", b"three"],
    {"k": "key-123", "v": 17, "val": b"x" * 100, "c": "commit-id"},
    {1: "int keys", 2: {"nested": [b"bin", None]}},
    {"empty": {}, "list": []},
]


@pytest.mark.parametrize("body", BODIES)
def test_round_trip(body):
    frame = encode_record(7, 42, body)
    decoded = decode_record(frame)
    assert decoded.status is FrameStatus.OK
    assert (decoded.rtype, decoded.lsn, decoded.body) == (7, 42, body)
    assert decoded.offset == 0
    assert decoded.end == len(frame)
    assert decoded.reason == ""


def test_layout_matches_the_documented_frame():
    body = {"a": b"b"}
    frame = encode_record(200, 0x0102030405060708, body)
    payload = msgpack.packb(body, use_bin_type=True)
    length, crc = struct.unpack_from("<II", frame, 0)
    assert length == len(payload)
    assert frame[8] == 200
    assert frame[9:17] == bytes.fromhex("0807060504030201")  # LSN, little-endian
    assert frame[17:] == payload
    assert crc == crc32c(frame[8:])  # type + LSN + body
    assert HEADER_SIZE == 17


def test_frames_chain_through_a_buffer():
    frames = [encode_record(1 + i % 255, i + 1, {"i": i, "pad": "x" * i}) for i in range(300)]
    buf = b"".join(frames)
    offset, seen = 0, []
    while offset < len(buf):
        decoded = decode_record(buf, offset)
        assert decoded.status is FrameStatus.OK
        seen.append((decoded.lsn, decoded.body["i"]))
        offset = decoded.end
    assert seen == [(i + 1, i) for i in range(300)]
    assert [(lsn, body["i"]) for lsn, _, body, _ in iter_records(buf)] == seen


@pytest.mark.parametrize("rtype", [1, 255])
def test_extreme_record_types_round_trip(rtype):
    assert decode_record(encode_record(rtype, 1, "x")).rtype == rtype


@pytest.mark.parametrize(("rtype", "lsn"), [(0, 1), (256, 1), (-1, 1), (1, 0), (1, -5)])
def test_reserved_types_and_lsns_are_refused(rtype, lsn):
    with pytest.raises(ValueError):
        encode_record(rtype, lsn, "x")


def test_oversized_body_is_refused(monkeypatch):
    monkeypatch.setattr(record, "MAX_BODY_BYTES", 64)
    with pytest.raises(ValueError, match="over the 64 limit"):
        encode_record(1, 1, b"x" * 100)


def test_every_cut_is_truncated():
    frame = encode_record(3, 9, {"k": "v" * 40})
    for cut in range(len(frame)):
        decoded = decode_record(frame[:cut])
        assert decoded.status is FrameStatus.TRUNCATED, cut
        assert list(iter_records(frame[:cut])) == []


def test_every_flipped_byte_after_the_length_is_bad():
    frame = encode_record(3, 9, {"k": "v" * 40})
    for i in range(4, len(frame)):
        damaged = bytearray(frame)
        damaged[i] ^= 0x40
        decoded = decode_record(bytes(damaged))
        assert decoded.status is FrameStatus.BAD, i
        assert decoded.end == len(frame)
        assert list(iter_records(bytes(damaged))) == []


def test_a_flipped_length_byte_is_never_ok():
    frame = encode_record(3, 9, {"k": "v" * 40})
    for i in range(4):
        for bit in range(8):
            damaged = bytearray(frame + b"\x01" * 64)
            damaged[i] ^= 1 << bit
            decoded = decode_record(bytes(damaged))
            assert decoded.status in (FrameStatus.BAD, FrameStatus.TRUNCATED), (i, bit)


def test_absurd_length_is_bad_without_the_bytes():
    header = struct.pack("<IIBQ", (64 << 20) + 1, 0, 1, 1)
    decoded = decode_record(header)
    assert decoded.status is FrameStatus.BAD
    assert "absurd" in decoded.reason
    assert decoded.end is None


def test_zero_bytes_are_not_a_record():
    decoded = decode_record(bytes(64))
    assert decoded.status is FrameStatus.BAD
    assert list(iter_records(bytes(64))) == []


def test_reserved_type_with_matching_crc_is_bad():
    covered = struct.pack("<BQ", 0, 5) + msgpack.packb("x")
    frame = struct.pack("<II", len(covered) - 9, crc32c(covered)) + covered
    decoded = decode_record(frame)
    assert decoded.status is FrameStatus.BAD
    assert "reserved" in decoded.reason


def test_undecodable_body_with_matching_crc_is_bad():
    covered = struct.pack("<BQ", 1, 5) + b"\xc1"  # 0xc1 is never used by msgpack
    frame = struct.pack("<II", 1, crc32c(covered)) + covered
    decoded = decode_record(frame)
    assert decoded.status is FrameStatus.BAD
    assert "does not decode" in decoded.reason
    assert decode_record(frame, decode_body=False).status is FrameStatus.OK


def test_decode_at_an_offset():
    first, second = encode_record(1, 1, "a"), encode_record(2, 2, "b")
    decoded = decode_record(first + second, len(first))
    assert (decoded.status, decoded.offset, decoded.lsn, decoded.body) == (
        FrameStatus.OK,
        len(first),
        2,
        "b",
    )


def test_iter_records_skips_bodies_below_decode_from_lsn():
    buf = b"".join(encode_record(1, lsn, {"lsn": lsn}) for lsn in range(1, 6))
    got = [(lsn, body) for lsn, _, body, _ in iter_records(buf, decode_from_lsn=4)]
    assert got == [(1, None), (2, None), (3, None), (4, {"lsn": 4}), (5, {"lsn": 5})]


def test_iter_records_stops_at_the_first_invalid_frame():
    frames = [encode_record(1, lsn, "x" * 30) for lsn in range(1, 5)]
    damaged = bytearray(b"".join(frames))
    damaged[len(frames[0]) + len(frames[1]) + HEADER_SIZE + 5] ^= 1  # the third frame's body
    got = list(iter_records(bytes(damaged)))
    assert [lsn for lsn, _, _, _ in got] == [1, 2]
    stop = got[-1][3]
    assert decode_record(bytes(damaged), stop).status is FrameStatus.BAD
