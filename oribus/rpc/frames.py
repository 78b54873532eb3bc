"""The frames of the stream transport (``stream_client``, ``stream_server``): sans-IO.

A connection is a byte stream (TCP, optionally TLS through the ``ssl`` module)
carrying length-prefixed msgpack frames, both ways::

    offset  size  field
    0       4     length   unsigned, big-endian: the size of the body in bytes
                           (at most ``MAX_FRAME_BYTES``; a larger length is refused
                           before any of its body is read)
    4       n     body     one msgpack value

The first frame a client sends is its hello; the server answers it, then the
connection carries one kind of traffic until it closes::

    hello     ["oribus-stream", 1, service, "calls"]
              ["oribus-stream", 1, service, "watch", watch_request]
              either one followed by {"token": T}: the caller's credential (specs/auth.md
              §2), the identity of every call of the connection
    answer    []                 accepted (for a watch: subscribed, every later change follows)
              {"code", ...}      refused: the error (``OribusError.to_dict``), then the close

    calls     client -> server   [[call_id, op, args], ...]           as the gRPC Stream
              server -> client   [[call_id, status, payload], ...]    (``oribus.rpc.wire``)
    watch     server -> client   [change, ...]                        (``Change.to_wire``)
                                 nil                                  the watch ended normally

On either kind, a map from the server is an error about the whole connection
(a frame it could not read, an unknown service, a failed watch: its code says
which, e.g. ``WatchLagged``); the server closes the connection after it. A
connection that ends without one, or a watch without its nil, was lost: the
client fails what it had in flight with ``Unavailable``.

Errors here: a frame over the limit or one whose body is not msgpack is an
``InvalidRequest``; the server answers it with the error map and closes only that
connection, after handling the frames before it.
"""

from __future__ import annotations

import struct
from collections.abc import Collection
from typing import Any

import msgpack

from oribus.errors import InvalidRequest
from oribus.rpc import wire

LENGTH = struct.Struct(">I")  # the frame header: the body's length, unsigned 32-bit big-endian
MAX_FRAME_BYTES = wire.MAX_MESSAGE_BYTES  # the same limit as a gRPC message

MAGIC = "oribus-stream"
VERSION = 1
CALLS, WATCH = "calls", "watch"


def frame(body: bytes) -> bytes:
    """One frame: the length header, then ``body``."""
    return LENGTH.pack(len(body)) + body


def pack_frame(value: Any) -> bytes:
    return frame(wire.pack(value))


def array_header(n: int) -> bytes:
    """The msgpack header of an array of ``n`` elements: a batch is this header followed by
    its elements, each packed on its own."""
    if n < 16:
        return bytes((0x90 | n,))
    if n < 1 << 16:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


def hello(service: str, kind: str, request: Any = None, token: str | None = None) -> list:
    value = [MAGIC, VERSION, service, kind] if kind == CALLS else [MAGIC, VERSION, service, kind, request]
    if token:
        value.append({"token": token})
    return value


def hello_token(value: list) -> str | None:
    """The credential a checked hello (``check_hello``) carries, if any: in the options map
    after the kind (calls) or after the watch request (watch)."""
    at = 4 if value[3] == CALLS else 5
    options = value[at] if len(value) > at else None
    if isinstance(options, dict):
        token = options.get("token")
        return token if isinstance(token, str) and token else None
    return None


def check_hello(value: Any, service: str | Collection[str]) -> tuple[str, Any]:
    """(kind, watch request or None) of a client's first frame; InvalidRequest if it is not a hello
    for ``service`` (or one of the services named) in a version this side speaks."""
    if not (isinstance(value, list) and len(value) >= 4 and value[0] == MAGIC):
        raise InvalidRequest("the first frame of a connection must be an oribus-stream hello")
    if value[1] != VERSION:
        raise InvalidRequest(f"oribus-stream version {value[1]!r} is not spoken here (only {VERSION})")
    served = (service,) if isinstance(service, str) else tuple(service)
    if value[2] not in served:
        raise InvalidRequest(f"this server serves {', '.join(served)}, not {value[2]!r}")
    options = len(value) > 4 and isinstance(value[-1], dict) and (value[3] == CALLS or len(value) == 6)
    if options and not all(isinstance(k, str) for k in value[-1]):
        raise InvalidRequest("a hello's options are a map of names")
    if value[3] == CALLS and len(value) == 4 + options:
        return CALLS, None
    if value[3] == WATCH and len(value) == 5 + options:
        return WATCH, value[4]
    raise InvalidRequest(f"unknown connection kind {value[3]!r}")


def unpack_body(body: bytes | bytearray | memoryview) -> Any:
    try:
        return msgpack.unpackb(body, raw=False, strict_map_key=False)
    except Exception as e:  # msgpack raises several unrelated types
        raise InvalidRequest(f"malformed frame: {e}") from None


class FrameReader:
    """Cuts a byte stream into frame bodies, whatever the chunks it arrives in.

    ``feed(data)`` returns the bodies completed by ``data`` (possibly none); a
    partial frame waits for the next chunk. A length over ``limit`` is refused at
    once, before its body arrives: ``feed`` returns the frames before it and sets
    ``error`` (an ``InvalidRequest``); the stream is unusable from there on (every later
    ``feed`` raises it), so the caller handles those frames, then the error.

    No body is copied more than once: a frame whole in its chunk comes out as a view of
    the chunk; a frame split over chunks (a large value's, typically) keeps its chunks as
    they arrive and is joined once, when its last byte is in. Nothing is reserved ahead
    of the bytes that came (a header alone costs nothing). A body is a bytes-like object
    (``unpack_body`` reads them all).
    """

    __slots__ = ("_head", "_missing", "_parts", "error", "limit")

    def __init__(self, limit: int = MAX_FRAME_BYTES) -> None:
        self.limit = limit
        self.error: InvalidRequest | None = None
        self._head = b""  # the start of a header split over chunks (under 4 bytes)
        self._parts: list[memoryview] = []  # what has come of a frame split over chunks
        self._missing = 0  # how much of that frame's body is still to come

    @property
    def buffered(self) -> int:
        """Bytes received and not yet returned as a frame (a partial frame)."""
        if self._parts:
            return 4 + sum(len(p) for p in self._parts)
        return len(self._head)

    def feed(self, data: bytes) -> list[bytes | memoryview]:
        if self.error is not None:
            raise self.error
        bodies: list[bytes | memoryview] = []
        if self._head:
            data = self._head + data  # a header split over chunks: rare, and under 4 bytes
            self._head = b""
        view = memoryview(data)
        pos, end = 0, len(view)
        parts = self._parts
        if parts:  # the rest of a frame split over chunks
            take = min(end, self._missing)
            parts.append(view[:take])
            self._missing -= take
            if self._missing:
                return bodies
            bodies.append(b"".join(parts))
            parts.clear()
            pos = take
        unpack_from, limit = LENGTH.unpack_from, self.limit
        while end - pos >= 4:
            (size,) = unpack_from(view, pos)
            if size > limit:
                self.error = InvalidRequest(f"a frame of {size} bytes is over the limit of {limit} bytes")
                return bodies
            stop = pos + 4 + size
            if stop > end:  # split over chunks: kept as they come, joined once complete
                parts.append(view[pos + 4:end])
                self._missing = stop - end
                return bodies
            bodies.append(view[pos + 4:stop])
            pos = stop
        if pos < end:
            self._head = bytes(view[pos:end])
        return bodies
