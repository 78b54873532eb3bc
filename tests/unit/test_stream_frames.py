"""The frames of the stream transport (``oribus.rpc.frames``): cutting a byte stream into
frames whatever its chunks, refusing an oversized or unreadable frame, the hello."""

from __future__ import annotations

import msgpack
import pytest

from oribus.errors import InvalidRequest
from oribus.rpc import frames


def stream_of(*values: object) -> bytes:
    return b"".join(frames.pack_frame(v) for v in values)


VALUES = [[[1, "read", {"k": ["a", "b"]}]], [], {"code": "Unavailable"}, None, [[2, 0, b"\x00" * 300]]]


def test_frames_come_out_whole_whatever_the_chunks() -> None:
    data = stream_of(*VALUES)
    for chunk in (1, 2, 3, 4, 5, 7, 64, len(data)):
        reader = frames.FrameReader()
        got = []
        for i in range(0, len(data), chunk):
            got += [frames.unpack_body(b) for b in reader.feed(data[i:i + chunk])]
        assert got == VALUES, chunk
        assert reader.buffered == 0


def test_a_partial_frame_waits_for_the_rest() -> None:
    reader = frames.FrameReader()
    data = stream_of([[1, "stats", {}]])
    assert reader.feed(data[:2]) == []  # half a header
    assert reader.feed(data[2:9]) == []  # the header and part of the body
    assert reader.buffered == 9
    (body,) = reader.feed(data[9:])
    assert frames.unpack_body(body) == [[1, "stats", {}]]


def test_several_frames_and_a_partial_one_in_one_chunk() -> None:
    reader = frames.FrameReader()
    data = stream_of([1], [2], [3])
    bodies = reader.feed(data[:-1])
    assert [frames.unpack_body(b) for b in bodies] == [[1], [2]]
    assert [frames.unpack_body(b) for b in reader.feed(data[-1:])] == [[3]]


def test_an_oversized_frame_is_refused_from_its_header() -> None:
    reader = frames.FrameReader(limit=100)
    assert reader.feed(frames.pack_frame(b"x" * 90))  # under the limit: fine
    assert reader.error is None
    # refused before any of its body arrives; the frames before it in the chunk come out first
    assert [frames.unpack_body(b) for b in reader.feed(frames.pack_frame([1]) + frames.LENGTH.pack(101))] == [[1]]
    assert "101 bytes is over the limit of 100" in reader.error.message
    assert reader.buffered == 0  # nothing more is kept ...
    with pytest.raises(InvalidRequest):
        reader.feed(frames.pack_frame([2]))  # ... nor read: the stream is unusable


def test_garbage_is_not_a_frame() -> None:
    reader = frames.FrameReader()
    (body,) = reader.feed(frames.frame(b"\xc1\xc1\xc1"))  # 0xc1 is never used by msgpack
    with pytest.raises(InvalidRequest, match="malformed frame"):
        frames.unpack_body(body)
    # random bytes read as a length over the limit: refused, not buffered without end
    reader = frames.FrameReader()
    assert reader.feed(b"GET / HTTP/1.1\r\n\r\n") == [] and reader.error is not None


@pytest.mark.parametrize("n", [0, 1, 15, 16, 65535, 65536])
def test_a_batch_packed_item_by_item_is_the_same_msgpack_array(n: int) -> None:
    items = [[i, 0, None] for i in range(n)]
    joined = frames.array_header(n) + b"".join(msgpack.packb(i) for i in items)
    assert joined == msgpack.packb(items)


def test_hello() -> None:
    service = "oribus.v1.Shard"
    assert frames.check_hello(frames.hello(service, frames.CALLS), service) == (frames.CALLS, None)
    assert frames.check_hello(frames.hello(service, frames.WATCH, {"p": "a/"}), service) == (frames.WATCH, {"p": "a/"})
    for bad, match in (
        ([[1, "read", {}]], "must be an oribus-stream hello"),
        (["oribus-stream", 2, service, "calls"], "version 2"),
        (["oribus-stream", 1, "oribus.v1.Bus", "calls"], "not 'oribus.v1.Bus'"),
        (["oribus-stream", 1, service, "gossip"], "unknown connection kind"),
        ("hello", "must be an oribus-stream hello"),
    ):
        with pytest.raises(InvalidRequest, match=match):
            frames.check_hello(bad, service)


def test_a_hello_may_carry_a_token() -> None:
    service = "oribus.v1.Bus"
    calls = frames.hello(service, frames.CALLS, token="T")
    watch = frames.hello(service, frames.WATCH, {"p": "a/", "token": "not the options"}, token="W")
    assert frames.check_hello(calls, service) == (frames.CALLS, None) and frames.hello_token(calls) == "T"
    assert frames.check_hello(watch, service) == (frames.WATCH, {"p": "a/", "token": "not the options"})
    assert frames.hello_token(watch) == "W"
    # without options, a watch request is not taken for them
    bare = frames.hello(service, frames.WATCH, {"token": "X"})
    assert frames.hello_token(bare) is None and frames.hello_token(frames.hello(service, frames.CALLS)) is None
    for bad in (["oribus-stream", 1, service, "calls", {1: "x"}],
                ["oribus-stream", 1, service, "calls", {"token": "T"}, {}],
                ["oribus-stream", 1, service, "watch", {"p": ""}, "token"]):
        with pytest.raises(InvalidRequest):
            frames.check_hello(bad, service)


def test_a_frame_split_over_chunks_is_copied_once() -> None:
    import tracemalloc

    value = [[1, 0, b"v" * (8 << 20)]]
    data = frames.pack_frame(value)
    chunks = [data[i:i + 65536] for i in range(0, len(data), 65536)]
    reader = frames.FrameReader()
    tracemalloc.start()
    try:
        bodies = []
        for chunk in chunks:
            bodies += reader.feed(chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    (body,) = bodies
    assert len(body) == len(data) - 4
    # the chunks as they came, and the body joined from them once: no growing buffer
    # copied at each chunk, no copy of the body out of it
    assert peak < 2 * len(data) + (1 << 20), peak
    assert frames.unpack_body(body) == value
    assert reader.buffered == 0


def test_a_header_alone_reserves_nothing() -> None:
    """A peer announcing the largest frame and sending nothing more costs what it sent."""
    import tracemalloc

    reader = frames.FrameReader()
    tracemalloc.start()
    try:
        assert reader.feed(frames.LENGTH.pack(frames.MAX_FRAME_BYTES) + b"x") == []
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert reader.buffered == 5
    assert peak < 64 << 10, peak
