"""The client end of the stream transport: many calls over one TCP (or TLS) connection, in batches.

What ``MuxClient`` does over a gRPC bidi stream, without gRPC: Python gRPC
costs ~100 µs of CPU per message on each side, a length-prefixed msgpack frame
over an asyncio transport ~8 µs (``benchmarks/transport_roundtrip.py``). The
frames are drawn in ``oribus.rpc.frames``; the calls and replies in them are
the same ``[call_id, op, args]`` / ``[call_id, status, payload]`` batches as
over gRPC (``oribus.rpc.wire``), so the operation tables (``SHARD_OPS``) and the
epoch on every call (``shard_codec.FENCE``) are the same too.

``StreamClient``  ``await call(op, args)``. Calls made in one turn of the event
                  loop leave as one frame (one write; a busy connection holds it
                  a few more turns, ``wire.HOLD_TURNS``), or as soon as it holds
                  ``wire.FRAME_ITEMS`` calls; replies come back in batches the
                  same way. Timeouts: one timer per connection,
                  armed for the earliest deadline, not a ``wait_for`` per call.
                  A broken connection fails every call in flight with
                  ``Unavailable`` (the caller decides whether a retry is safe);
                  the next call connects again.
``StreamWatch``   one watch, on a connection of its own, subscribed before
                  ``subscribed()`` returns.

An address is ``HOST:PORT`` (TCP) or ``unix:PATH`` (a Unix-domain socket: on one machine,
about a third less CPU per round trip than TCP over loopback, which runs the whole TCP
stack of both ends in every write).

The server end is ``oribus.rpc.stream_server``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import ssl
from typing import Any

import msgpack

from oribus.aio import take_outcome
from oribus.errors import InvalidRequest, OribusError, Unavailable, error_from_dict
from oribus.messages import Change, WatchRequest
from oribus.rpc import frames, grpc_status, wire

CONNECT_TIMEOUT = 10.0  # seconds to connect, handshake (TLS) and have the hello answered


UNIX = "unix:"  # the prefix of a Unix-domain socket's address: ``unix:/run/oribus/shard-0.sock``


def unix_path(address: str) -> str | None:
    """The socket path of a ``unix:PATH`` address; None for ``HOST:PORT``."""
    if not address.startswith(UNIX):
        return None
    path = address[len(UNIX):]
    if not path:
        raise InvalidRequest(f"a Unix socket address is unix:PATH, not {address!r}")
    return path


def split_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) as (host, port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise InvalidRequest(f"an address is HOST:PORT, not {address!r}")
    return host.strip("[]"), int(port)


class StreamClient:
    """Calls to one service at ``target`` over one connection (see the module docstring).

    ``ssl``: a client context (``oribus.tls.client_ssl_context``) for mutual TLS,
    None for plain TCP; ``server_hostname``: the name checked in the server's
    certificate (default: the target's host).
    """

    def __init__(self, target: str, service: str, *, ssl: ssl.SSLContext | None = None,
                 server_hostname: str | None = None, timeout: float = wire.DEFAULT_CALL_TIMEOUT,
                 connect_timeout: float = CONNECT_TIMEOUT, max_frame_bytes: int = frames.MAX_FRAME_BYTES,
                 token: str | None = None) -> None:
        self.target = target
        self.service = service
        self.timeout = timeout  # seconds a call waits for its reply before Unavailable
        self.connect_timeout = min(connect_timeout, timeout)
        self.max_frame_bytes = max_frame_bytes
        self.token = token  # the credential every hello carries (specs/auth.md §2)
        self._path = unix_path(target)  # a Unix-domain socket (the same machine), or TCP
        self._host, self._port = ("", 0) if self._path is not None else split_address(target)
        self._ssl = ssl
        self._server_hostname = (server_hostname or self._host or "localhost") if ssl is not None else None
        self._conn: _Calls | None = None
        self._attempt: asyncio.Task | None = None  # the connection being opened, shared by its waiters
        self._ids = itertools.count(1)
        self._closed = False
        self._watches: set[_Watch] = set()
        self.counters = {"calls": 0, "messages_out": 0, "messages_in": 0, "reconnects": 0}

    @property
    def connected(self) -> bool:
        """Whether the calls connection is open (it opens again on the next call when not)."""
        return self._conn is not None

    @property
    def secure(self) -> bool:
        return self._ssl is not None

    async def call(self, op: str, args: Any, timeout: float | None = None) -> Any:
        """Send one call and wait for its reply; errors come back as OribusError."""
        conn = self._conn
        if conn is None:
            conn = await self._connection()
        call_id = next(self._ids)
        fut = conn.submit(call_id, op, args, timeout or self.timeout)
        self.counters["calls"] += 1
        try:
            status, payload = await fut
        finally:
            conn.pending.pop(call_id, None)
        if status == wire.OK:
            return payload
        grpc_status.raise_error(payload)

    async def call_op(self, table: dict[str, wire.Op], op: str, *params: Any) -> Any:
        """Call ``op`` of an operation table (``SHARD_OPS``) with Python params."""
        o = table[op]
        return o.dec_result(await self.call(op, o.enc_args(*params)))

    async def connect(self) -> None:
        """Open the calls connection now (calls open it when they need it): Unavailable, with
        the reason, if the server cannot be reached or refuses the hello."""
        if self._conn is None:
            await self._connection()

    def watch(self, request: WatchRequest) -> StreamWatch:
        """A watch over its own connection: an async iterator of Change."""
        return StreamWatch(self, request)

    async def _connection(self) -> _Calls:
        if self._closed:
            raise Unavailable(f"connection to {self.target} is closed")
        attempt = self._attempt
        if attempt is None:
            attempt = self._attempt = asyncio.get_running_loop().create_task(self._reconnect())
            # its waiters may all give up before it ends: its error is taken here, not logged
            attempt.add_done_callback(take_outcome)
        # shield: a caller that gives up must not cancel the attempt the others wait for
        return await asyncio.shield(attempt)

    async def _reconnect(self) -> _Calls:
        try:
            try:
                conn = await self._open(_Calls(self), frames.hello(self.service, frames.CALLS, token=self.token))
            except OribusError as e:
                if isinstance(e, Unavailable):
                    raise
                raise Unavailable(f"{self.target} refused the connection: {e.code}: {e.message}") from None
            if self._closed:
                conn.abort(Unavailable(f"connection to {self.target} is closed"))
                raise Unavailable(f"connection to {self.target} is closed")
            self._conn = conn
            self.counters["reconnects"] += 1
            return conn
        finally:
            self._attempt = None

    async def _open(self, conn: _Connection, hello: list) -> Any:
        """Connect ``conn``, send ``hello`` and wait for the server's answer."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                if self._path is not None:
                    await loop.create_unix_connection(lambda: conn, self._path, ssl=self._ssl,
                                                      server_hostname=self._server_hostname)
                else:
                    await loop.create_connection(lambda: conn, self._host, self._port, ssl=self._ssl,
                                                 server_hostname=self._server_hostname)
                conn.write_frame(hello)
                await conn.welcomed
        except TimeoutError:
            conn.abort(None)
            raise Unavailable(f"connecting to {self.target} timed out after {self.connect_timeout:g}s") from None
        except OribusError:  # the server refused the hello (its error), or hung up on it
            conn.abort(None)
            raise
        except (OSError, EOFError) as e:
            conn.abort(None)
            raise self._connect_failure(e) from None
        return conn

    def _connect_failure(self, e: BaseException) -> Unavailable:
        """A failed connection, naming TLS when that is what failed (the ``ssl`` errors are terse)."""
        if isinstance(e, ConnectionRefusedError):
            return Unavailable(f"connection to {self.target} refused (nothing listens there)")
        if isinstance(e, ssl.SSLCertVerificationError):
            text = (e.verify_message or str(e)).lower()
            if "mismatch" in text or "hostname" in text:
                meaning = (f"the server's certificate does not name {self._server_hostname} "
                           "(add it with certs init --hosts, or set ssl_target_name_override)")
            else:
                meaning = "the server's certificate is not signed by our CA (ca.crt)"
            return Unavailable(f"TLS handshake with {self.target} failed: {meaning} ({e.verify_message or e})")
        if isinstance(e, ssl.SSLError):
            text = str(e).lower()
            if "wrong_version_number" in text or "wrong version number" in text or "record" in text:
                return Unavailable(f"TLS handshake with {self.target} failed: the server does not speak TLS ({e})")
            return Unavailable(f"TLS handshake with {self.target} failed: {e}")
        return Unavailable(f"cannot connect to {self.target}: {type(e).__name__}: {e}")

    def _hung_up(self, cause: BaseException | None) -> Unavailable:
        """The server closed the connection before answering the hello."""
        detail = f" ({type(cause).__name__}: {cause})" if cause is not None else ""
        if self.secure:
            return Unavailable(
                f"TLS handshake with {self.target} failed: the server closed the connection: it did not "
                f"accept this client's certificate (is client.crt signed by the server's CA?){detail}")
        return Unavailable(
            f"connection to {self.target} was closed by the server before it answered: it most likely "
            f"requires TLS; connect with tls=<directory of `oribus certs init`> (command line: --tls-dir DIR)"
            f"{detail}")

    async def close(self) -> None:
        """Fail calls in flight and close the connections. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._attempt is not None:
            self._attempt.cancel()
            with contextlib.suppress(BaseException):
                await self._attempt
        closed = Unavailable(f"connection to {self.target} is closed")
        if self._conn is not None:
            self._conn.abort(closed)
        for w in list(self._watches):
            w.abort(closed)


class _Connection(asyncio.Protocol):
    """What both kinds of client connection share: frames in, the hello's answer, the end."""

    def __init__(self, client: StreamClient) -> None:
        self.client = client
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.reader = frames.FrameReader(client.max_frame_bytes)
        self.welcomed: asyncio.Future[None] = self.loop.create_future()
        self.error: Unavailable | None = None  # why the connection ended (None while it is up) ...
        self.cause: OribusError | None = None  # ... and the error the server named, if it named one

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # asyncio types it a BaseTransport; a stream connection's can write (uvloop's is no
        # asyncio.WriteTransport subclass, so an isinstance check would refuse it)
        self.transport = transport  # type: ignore[assignment]

    def write_frame(self, value: Any) -> None:
        assert self.transport is not None
        self.transport.write(frames.pack_frame(value))

    def data_received(self, data: bytes) -> None:
        try:
            for body in self.reader.feed(data):
                value = frames.unpack_body(body)
                if not self.welcomed.done():
                    self._answer(value)
                elif isinstance(value, dict):
                    self._server_error(value)
                else:
                    self.on_frame(value)
                if self.error is not None:
                    return
            if self.reader.error is not None:  # after the frames that came before it
                raise self.reader.error
        except InvalidRequest as e:  # a frame this side cannot read (frames.FrameReader, unpack_body)
            self.abort(Unavailable(f"{self.client.target} sent a frame this client cannot read: {e.message}"))

    def _answer(self, value: Any) -> None:
        if value == []:
            self.welcomed.set_result(None)
        elif isinstance(value, dict):
            self.abort(error_from_dict(value))  # refused: e.g. a watch asking for lost history
        else:
            self.abort(Unavailable(f"{self.client.target} does not answer as an oribus-stream server"))

    def _server_error(self, value: dict) -> None:
        """A map from the server: an error about the whole connection; it closes after it."""
        self.abort(error_from_dict(value))

    def on_frame(self, value: Any) -> None:
        raise NotImplementedError

    def eof_received(self) -> bool:
        return False  # close our side too; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        if self.error is not None:
            return
        if not self.welcomed.done():
            self.abort(self.client._hung_up(exc))  # noqa: SLF001
        elif exc is not None:
            self.abort(Unavailable(f"connection to {self.client.target} failed: {type(exc).__name__}: {exc}"))
        else:
            self.abort(Unavailable(f"{self.client.target} closed the connection"))

    def abort(self, error: OribusError | None) -> None:
        """End the connection; whatever waits on it gets ``error`` (calls in flight: as
        ``Unavailable``). Idempotent."""
        if self.error is not None:
            return
        if error is None:
            error = Unavailable(f"connection to {self.client.target} was abandoned")
        self.cause = error
        self.error = error if isinstance(error, Unavailable) else Unavailable(
            f"{self.client.target} closed the connection: {error.code}: {error.message}")
        if not self.welcomed.done():
            self.welcomed.set_exception(error)
            self.welcomed.exception()  # retrieved: whoever awaited it has been told
        self.ended()
        if self.transport is not None:
            self.transport.abort()

    def ended(self) -> None:
        """The connection is over (``self.error`` says why)."""


class _Calls(_Connection):
    """The connection carrying a StreamClient's calls."""

    def __init__(self, client: StreamClient) -> None:
        super().__init__(client)
        # call id -> (future of (status, payload), deadline, op)
        self.pending: dict[int, tuple[asyncio.Future, float, str]] = {}
        self.outbox: list[list] = []  # calls of this loop turn, sent by _flush
        self._flush_soon = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._counters = client.counters
        self._pack = msgpack.Packer(use_bin_type=True).pack  # one per connection: a Packer is not shared

    def submit(self, call_id: int, op: str, args: Any, timeout: float) -> asyncio.Future:
        if self.error is not None:
            raise self.error
        fut = self.loop.create_future()
        deadline = self.loop.time() + timeout
        self.pending[call_id] = (fut, deadline, op)
        self.outbox.append([call_id, op, args])
        if len(self.outbox) >= wire.FRAME_ITEMS:
            self._send()
        elif not self._flush_soon:
            self._flush_soon = True
            # busy: hold the frame a few loop turns so more calls join it (wire.HOLD_TURNS)
            turns = wire.HOLD_TURNS if len(self.pending) > wire.BUSY_CALLS else 0
            self.loop.call_soon(self._flush, turns)
        if self._timer is None or deadline < self._timer_at:
            self._arm(deadline)
        return fut

    # -- sending: one write per loop turn, or per FRAME_ITEMS calls -------------------------

    def _flush(self, hold: int = 0) -> None:
        if hold:
            self.loop.call_soon(self._flush, hold - 1)
            return
        self._flush_soon = False
        self._send()

    def _send(self) -> None:
        if self.error is not None or not self.outbox:
            return
        batch, self.outbox = self.outbox, []
        try:
            body = self._pack(batch)
        except Exception:  # noqa: BLE001 - an argument msgpack cannot encode: find it below
            body = b""
        if not body or len(body) > self.client.max_frame_bytes:
            self._flush_one_by_one(batch)
            return
        self.transport.write(frames.LENGTH.pack(len(body)) + body)  # type: ignore[union-attr]
        self._counters["messages_out"] += 1

    def _flush_one_by_one(self, batch: list[list]) -> None:
        """The slow path: a call that cannot be encoded, or a batch over the frame limit. Each call
        is encoded on its own; one that cannot be sent fails alone, the rest go in frames under
        the limit."""
        limit = self.client.max_frame_bytes - 8  # room for the array header
        parts: list[bytes] = []
        size = 0
        for call in batch:
            try:
                packed = self._pack(call)
            except Exception as e:  # noqa: BLE001
                self._fail_call(call[0], InvalidRequest(f"{call[1]}: arguments that cannot be encoded: {e}"))
                continue
            if len(packed) > limit:
                self._fail_call(call[0], InvalidRequest(
                    f"{call[1]}: a call of {len(packed)} bytes is over the frame limit of "
                    f"{self.client.max_frame_bytes} bytes"))
                continue
            if size + len(packed) > limit:
                self._write_parts(parts)
                parts, size = [], 0
            parts.append(packed)
            size += len(packed)
        self._write_parts(parts)

    def _write_parts(self, parts: list[bytes]) -> None:
        if parts:
            self.transport.write(frames.frame(frames.array_header(len(parts)) + b"".join(parts)))  # type: ignore[union-attr]
            self._counters["messages_out"] += 1

    def _fail_call(self, call_id: int, error: OribusError) -> None:
        entry = self.pending.pop(call_id, None)
        if entry is not None and not entry[0].done():
            entry[0].set_exception(error)

    # -- receiving ------------------------------------------------------------------------

    def on_frame(self, value: Any) -> None:
        if not isinstance(value, list):
            self.abort(Unavailable(f"{self.client.target} sent a reply batch that is not a list"))
            return
        self._counters["messages_in"] += 1
        pending = self.pending
        for reply in value:
            try:
                call_id, status, payload = reply
            except (TypeError, ValueError):
                self.abort(Unavailable(f"{self.client.target} sent a malformed reply {reply!r:.100}"))
                return
            entry = pending.pop(call_id, None)
            if entry is not None and not entry[0].done():
                entry[0].set_result((status, payload))

    # -- timeouts: one timer for the earliest deadline ---------------------------------------

    def _arm(self, deadline: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_at(deadline, self._expire)
        self._timer_at = deadline

    def _expire(self) -> None:
        self._timer = None
        now = self.loop.time()
        earliest = None
        for call_id, (fut, deadline, op) in list(self.pending.items()):
            if deadline <= now:
                del self.pending[call_id]
                if not fut.done():
                    fut.set_exception(Unavailable(f"{op} on {self.client.target} timed out; its outcome is unknown"))
            elif earliest is None or deadline < earliest:
                earliest = deadline
        if earliest is not None:
            self._arm(earliest)

    def ended(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pending, self.pending = self.pending, {}
        self.outbox.clear()
        error = self.error or Unavailable(f"connection to {self.client.target} ended")
        for fut, _, _ in pending.values():
            if not fut.done():
                fut.set_exception(error)
        if self.client._conn is self:  # noqa: SLF001 - the next call connects again
            self.client._conn = None  # noqa: SLF001


class _Watch(_Connection):
    """The connection of one StreamWatch: change batches in, nil at the end."""

    HIGH_WATER = 1024  # changes buffered before reading pauses (TCP then slows the server down)
    LOW_WATER = 256

    def __init__(self, client: StreamClient) -> None:
        super().__init__(client)
        self.buffer: collections.deque = collections.deque()
        self.finished: BaseException | None = None  # StopAsyncIteration or the error, after the buffer
        self._waiter: asyncio.Future | None = None
        self._paused = False

    def on_frame(self, value: Any) -> None:
        if value is None:  # the watch ended normally
            self.finished = StopAsyncIteration()
            self._wake()
            if self.transport is not None:
                self.transport.close()
            return
        if not isinstance(value, list):
            self.abort(Unavailable(f"{self.client.target} sent a watch frame that is not a list"))
            return
        self.buffer.extend(value)
        if len(self.buffer) > self.HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def next_change(self) -> Change:
        while not self.buffer:
            if self.finished is not None:
                raise self.finished
            if self.cause is not None:
                raise self.cause  # the exact error the server named (WatchLagged, ...), else Unavailable
            self._waiter = self.loop.create_future()
            await self._waiter
        if self._paused and len(self.buffer) <= self.LOW_WATER and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return Change.from_wire(self.buffer.popleft())

    def connection_lost(self, exc: Exception | None) -> None:
        if self.finished is None:
            super().connection_lost(exc)
        else:
            self.client._watches.discard(self)  # noqa: SLF001
        self._wake()

    def ended(self) -> None:
        self._wake()
        self.client._watches.discard(self)  # noqa: SLF001


class StreamWatch:
    """The client end of one watch: an async iterator of Change.

    ``subscribed()`` connects, sends the request and waits for the server's
    answer: the server answers once its watch is registered, so every change
    made visible after ``subscribed()`` returns is delivered. A lost connection
    raises ``Unavailable`` (resume from the last versions seen).
    """

    def __init__(self, client: StreamClient, request: WatchRequest) -> None:
        self._client = client
        self._request = request
        self._conn: _Watch | None = None

    async def subscribed(self) -> None:
        if self._conn is not None:
            return
        if self._client._closed:  # noqa: SLF001
            raise Unavailable(f"connection to {self._client.target} is closed")
        conn = _Watch(self._client)
        hello = frames.hello(self._client.service, frames.WATCH, self._request.to_wire(), token=self._client.token)
        await self._client._open(conn, hello)  # noqa: SLF001
        self._client._watches.add(conn)  # noqa: SLF001
        self._conn = conn

    def __aiter__(self) -> StreamWatch:
        return self

    async def __anext__(self) -> Change:
        await self.subscribed()
        assert self._conn is not None
        return await self._conn.next_change()

    async def aclose(self) -> None:
        if self._conn is not None:
            self._conn.abort(Unavailable("the watch was closed"))
