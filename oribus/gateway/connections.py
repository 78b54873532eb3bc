"""The gateway's connections: limits that keep slow or too many clients from holding the
server, and a clear word to gRPC clients that dialled the HTTP port.

aiohttp parses HTTP; this module only decides when a connection must go
(``specs/http.md``, "Connections"):

* ``idle_timeout`` — a connection waiting for its next request (or a new one for
  its first) is closed after this long: aiohttp's keep-alive timer.
* ``header_timeout`` — from a request's first byte to its last header line.
  A client that trickles a header a byte at a time (slowloris) is closed.
* ``body_timeout`` — enforced where a route reads the body
  (``HttpGateway.body``: 408 and the connection closed); a body nobody reads
  is drained for at most as long (aiohttp's lingering close), then closed.
* ``max_connections`` — past it a new connection gets a 503 and is closed at
  once. One WARNING line when the cap is reached and one when the count is
  back under 90 % of it (with how many were refused meanwhile), so a flood
  leaves two lines, not one per connection.
* An HTTP/2 connection preface (``PRI * HTTP/2.0``, RFC 9113 §3.4) — a gRPC
  client pointed at the HTTP port — gets one WARNING line naming the mistake
  and an HTTP/1.1 400 (which gRPC reports as "trying to connect an http1.x
  server"), instead of aiohttp's ERROR traceback for a bad request line.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from aiohttp import web

log = logging.getLogger("oribus.http")

HTTP2_PREFACE_START = b"PRI "  # no HTTP/1 client sends the method RFC 9113 reserved for the preface


def _refusal(status: str, message: str) -> bytes:
    body = json.dumps({"error": status.split(" ", 1)[1].replace(" ", ""), "message": message}).encode()
    return (f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n").encode() + body


OVER_CAPACITY = _refusal("503 Service Unavailable", "the HTTP gateway is at its connection limit; retry later")
NOT_HTTP2 = _refusal("400 Bad Request", "this is the oribus HTTP port (HTTP/1.1); point gRPC clients at the gRPC port")


class ConnectionCap:
    """Counts the open connections and admits a new one only under ``limit``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open = 0
        self.refused = 0  # since the cap was last reached
        self._at_cap = False

    def admit(self) -> bool:
        if self.open < self.limit:
            self.open += 1
            return True
        self.refused += 1
        if not self._at_cap:
            self._at_cap = True
            log.warning("HTTP connection cap reached: %d connections open; new connections get 503 "
                        "and are closed until some close (max_connections)", self.open)
        return False

    def release(self) -> None:
        self.open -= 1
        if self._at_cap and self.open <= self.limit * 9 // 10:  # hysteresis: a flood at the edge logs once
            log.warning("HTTP connections back under the cap: %d open; %d refused while it was reached",
                        self.open, self.refused)
            self._at_cap = False
            self.refused = 0


class GuardedConnection(web.RequestHandler):
    """aiohttp's connection handler with the connection cap, the header timeout and the
    HTTP/2 preface check. The idle timeout is aiohttp's ``keepalive_timeout``."""

    def __init__(self, manager: web.Server, *, cap: ConnectionCap, header_timeout: float, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._cap = cap
        self._header_timeout = header_timeout
        self._header_timer: asyncio.TimerHandle | None = None
        self._header_timer_count = 0  # requests parsed when the header timer was armed
        self._admitted = False
        self._seen_bytes = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self._cap.admit():
            # Never registered with aiohttp: refused, closed, and anything the client sends ignored.
            self._force_close = True
            self._manager = None
            # asyncio types it a BaseTransport; a stream server's can write (uvloop's is no
            # asyncio.WriteTransport subclass, so an isinstance check would skip it)
            transport.write(OVER_CAPACITY)  # type: ignore[attr-defined]
            transport.close()
            return
        self._admitted = True
        super().connection_made(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_header_timer()
        if self._admitted:
            self._admitted = False
            self._cap.release()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if not self._admitted:
            return  # refused at the cap: closing
        if not self._seen_bytes and data:
            self._seen_bytes = True
            if data.startswith(HTTP2_PREFACE_START):
                self._refuse_http2()
                return
        parsed = self._request_count
        super().data_received(data)
        if self._request_count != parsed:
            self._cancel_header_timer()  # the request's headers are complete
        elif (data and self._header_timer is None and self._current_request is None
              and not self._messages and not self._force_close):
            # Bytes of a request whose headers are not complete yet.
            self._header_timer_count = self._request_count
            self._header_timer = self._loop.call_later(self._header_timeout, self._header_timed_out)

    def _header_timed_out(self) -> None:
        self._header_timer = None
        if self._request_count != self._header_timer_count or self._current_request is not None:
            return  # a request arrived meanwhile; its body has its own timeout
        log.debug("closing an HTTP connection from %s: request headers incomplete after %.1f s",
                  self.peername, self._header_timeout)
        self.force_close()

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _refuse_http2(self) -> None:
        log.warning("HTTP port received an HTTP/2 (gRPC?) connection preface from %s: "
                    "point gRPC clients at the gRPC port", _address(self.peername))
        if self.transport is not None:
            self.transport.write(NOT_HTTP2)
        self.force_close()


def _address(peer: Any) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer)
