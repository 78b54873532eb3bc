"""The server end of the stream transport: a service's operations over TCP (or TLS), in batches.

``StreamListener`` serves the same handlers as ``mux_handlers`` (``wire.bind_ops``,
wrapped as the service needs, e.g. epoch-fenced by ``ShardServer``) and the same
watch handler, over the frames of ``oribus.rpc.frames``:

* a ``calls`` connection runs each call of a request batch at once, up to its
  first wait, and the rest of a call that waits as a task (``wire.start_eagerly``); the
  replies ready in one turn of the event loop leave as one frame (one write;
  with many calls running, a few turns more: ``wire.HOLD_TURNS``), a frame as soon as
  it holds ``wire.FRAME_ITEMS`` replies or ``wire.FRAME_BYTES`` of them; a reply that
  cannot be encoded or is over the frame limit alone becomes an error reply naming why;
* a ``watch`` connection subscribes, answers the hello once subscribed, then
  sends the changes (those of one loop turn in one frame) and nil at the end.

A frame that cannot be read (over the size limit, not msgpack, not a batch, a
bad hello) is answered with the error map and closes that connection only; the
listener and every other connection go on. An operation that raises an
unexpected exception is answered with an ``Internal`` error (``wire.dispatch``).
A call whose connection is lost runs to its end; its reply is dropped (to the
caller, a lost reply: ``Unavailable``, outcome unknown).

One listener may serve more than one service (``more``: service name -> its
operations): the hello names the service, and the connection carries that
service's calls only. A shard process serves the bus's ``oribus.v1.Shard`` and
its replica group's ``oribus.v1.Replica`` (``oribus.rpc.replica_codec``) on its
one stream port.

With an ``ssl`` context (``oribus.tls.server_ssl_context``) the listener speaks
TLS only and, by default, refuses a client without a certificate from the CA.
The client end is ``oribus.rpc.stream_client``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import ssl
import stat
from collections.abc import Mapping
from typing import Any

import msgpack

from oribus.auth.credential import CERTIFICATE, CREDENTIAL, agent_of_peercert
from oribus.errors import InvalidRequest, OribusError, Unavailable
from oribus.messages import WatchRequest
from oribus.rpc import frames, wire
from oribus.rpc.stream_client import split_address, unix_path

log = logging.getLogger("oribus.rpc.stream_server")


class StreamListener:
    """Serve ``ops`` (and ``watch``) of ``service`` on ``listen`` (``HOST:PORT``; port 0 picks one).

    ``await start()``; ``await stop(grace)`` stops accepting, answers calls that
    arrive meanwhile with ``Unavailable``, lets calls in flight finish for
    ``grace`` seconds, then closes every connection.
    """

    def __init__(self, listen: str, service: str, ops: dict[str, wire.Handler],
                 watch: wire.WatchHandler | None = None, *, ssl: ssl.SSLContext | None = None,
                 max_frame_bytes: int = frames.MAX_FRAME_BYTES,
                 more: Mapping[str, Mapping[str, wire.Handler]] | None = None) -> None:
        self.listen = listen
        self.service = service
        self.ops = ops
        # every service served here -> its operations (the watch is the main service's only)
        self.services: dict[str, Mapping[str, wire.Handler]] = {**(more or {}), service: ops}
        self.watch = watch
        self.max_frame_bytes = max_frame_bytes
        self.port = 0
        self.stopping = False
        self._path = unix_path(listen)
        self._host, self._port = ("", 0) if self._path is not None else split_address(listen)
        self._ssl = ssl
        self._server: asyncio.AbstractServer | None = None
        self.connections: set[_ServerConnection] = set()
        self.counters = {"connections": 0, "calls": 0, "messages_in": 0, "messages_out": 0, "refused": 0}

    @property
    def address(self) -> str:
        if self._path is not None:
            return self.listen
        return f"{self.listen.rsplit(':', 1)[0]}:{self.port}"

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            if self._path is not None:
                _remove_stale_socket(self._path)
                self._server = await loop.create_unix_server(lambda: _ServerConnection(self), self._path,
                                                             ssl=self._ssl)
                os.chmod(self._path, 0o600)  # this user's processes only, like the data it serves
                return
            self._server = await loop.create_server(lambda: _ServerConnection(self), self._host or None,
                                                    self._port, ssl=self._ssl, reuse_port=False)
        except OSError as e:
            raise OSError(e.errno, f"cannot listen on {self.listen}: {e.strerror or e}") from None
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self, grace: float = 2.0) -> None:
        """Idempotent."""
        if self._server is None:
            return
        server, self._server = self._server, None
        self.stopping = True
        server.close()
        running = {t for c in self.connections for t in c.running}
        if running and grace > 0:
            await asyncio.wait(running, timeout=grace)
        for conn in list(self.connections):
            conn.close(Unavailable(f"{self.service} at {self.address} is stopping"))
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 1.0)
        if self._path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path)


def _remove_stale_socket(path: str) -> None:
    """A socket file left by a listener that is gone (it crashed) would make the bind fail.
    One that still answers belongs to a live listener: refused, as a taken port is."""
    if not os.path.exists(path):
        return
    if not stat.S_ISSOCK(os.stat(path).st_mode):
        raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)  # nobody listens: stale
        return
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, f"another process listens on {path}")


class _ServerConnection(asyncio.Protocol):
    """One client's connection: its hello, then its calls or its watch."""

    def __init__(self, listener: StreamListener) -> None:
        self.listener = listener
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.reader = frames.FrameReader(listener.max_frame_bytes)
        self.kind: str | None = None  # None until the hello: frames.CALLS or frames.WATCH
        self.credential: str | None = None  # the hello's token: every call of the connection carries it
        self.certificate: tuple[str, tuple[str, ...]] | None = None  # an agent's client certificate (TLS)
        self.ops: Mapping[str, wire.Handler] = listener.ops  # those of the service the hello named
        self.running: set[asyncio.Task] = set()  # calls in flight
        self.outbox: list[bytes] = []  # replies (or changes) of this loop turn, packed, sent by _flush
        self._outbox_bytes = 0
        self.closed = False
        self._flush_soon = False
        self._watch_task: asyncio.Task | None = None
        self._drained: asyncio.Future | None = None  # set while the transport's buffer is full
        self._eof = False  # the client sent all it will send: close once its calls are answered
        self._counters = listener.counters
        self._pack = msgpack.Packer(use_bin_type=True).pack  # one per connection: a Packer is not shared

    # -- the connection's life ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # asyncio types it a BaseTransport; a stream connection's can write (uvloop's is no
        # asyncio.WriteTransport subclass, so an isinstance check would refuse it)
        self.transport = transport  # type: ignore[assignment]
        # over TLS (the handshake is done by now): an agent's certificate, if the client has one
        self.certificate = agent_of_peercert(transport.get_extra_info("peercert"))
        self.listener.connections.add(self)
        self._counters["connections"] += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.listener.connections.discard(self)
        if self._watch_task is not None:
            self._watch_task.cancel()
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        # calls in flight run to their end (their replies are dropped): a lost reply, not a
        # handler cut short half-way

    def eof_received(self) -> bool:
        # A client that half-closes (sends its calls, then EOF) still gets their replies.
        if self.kind == frames.CALLS and self.running:
            self._eof = True
            return True  # keep our side open until the calls are answered
        return False

    def _call_done(self, task: asyncio.Task) -> None:
        self.running.discard(task)
        if self._eof and not self.running:
            self.close()

    def close(self, error: OribusError | None = None) -> None:
        """Send what is pending (and ``error``, if any), then close. Cancels the watch and, once
        the listener stops, the calls still running."""
        if self.closed:
            return
        self._flush()
        if error is not None:
            self._write(error.to_dict())
        self.closed = True
        if self._watch_task is not None and self._watch_task is not asyncio.current_task():
            self._watch_task.cancel()
        if self.listener.stopping:
            for t in list(self.running):
                t.cancel()
        if self.transport is not None:
            self.transport.close()

    def _refuse(self, error: OribusError) -> None:
        """A frame this server cannot take: say why and close this connection only."""
        self._counters["refused"] += 1
        peer = self.transport.get_extra_info("peername") if self.transport is not None else None
        log.warning("closing the connection of %s: %s", peer, error.message)
        self.close(error)

    def pause_writing(self) -> None:
        # the client does not read its replies: stop reading its calls until it does
        if self.transport is not None and self.kind == frames.CALLS:
            self.transport.pause_reading()
        self._drained = self.loop.create_future()

    def resume_writing(self) -> None:
        if self.transport is not None and self.kind == frames.CALLS and not self.closed:
            self.transport.resume_reading()
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        self._drained = None

    # -- frames in ------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            for body in self.reader.feed(data):
                value = frames.unpack_body(body)
                if self.kind == frames.CALLS:
                    self._calls(value)
                elif self.kind is None:
                    self._hello(value)
                else:
                    raise InvalidRequest("a watch connection takes no frame after its hello")
                if self.closed:
                    return
            if self.reader.error is not None:  # after the frames that came before it
                raise self.reader.error
        except OribusError as e:
            self._refuse(e)
        except Exception as e:  # a bug must not take the server down: close this connection
            log.exception("reading a frame failed")
            self._refuse(OribusError(f"internal error: {type(e).__name__}: {e}"))

    def _hello(self, value: Any) -> None:
        kind, request = frames.check_hello(value, self.listener.services)
        self.credential = frames.hello_token(value)
        if self.listener.stopping:
            raise Unavailable(f"{self.listener.service} at {self.listener.address} is stopping")
        if kind == frames.CALLS:
            self.kind = frames.CALLS
            self.ops = self.listener.services[value[2]]
            self._write([])
            return
        if self.listener.watch is None or value[2] != self.listener.service:
            raise InvalidRequest("watch is not served here")
        self.kind = frames.WATCH
        self._watch_task = self.loop.create_task(self._serve_watch(WatchRequest.from_wire(request)))

    def _calls(self, value: Any) -> None:
        batch = wire.request_batch(value)
        self._counters["messages_in"] += 1
        self._counters["calls"] += len(batch)
        stopping = self.listener.stopping
        for call_id, op, args in batch:
            if stopping:
                self._reply([call_id, wire.ERROR, Unavailable(
                    f"{self.listener.service} at {self.listener.address} is stopping").to_dict()])
                continue
            # most calls never wait: run them now, a task only for the rest of one that does
            task = wire.start_eagerly(self.loop, self._run(call_id, op, args))
            if task is not None:
                self.running.add(task)
                task.add_done_callback(self._call_done)

    async def _run(self, call_id: Any, op: Any, args: Any) -> None:
        if self.credential is not None:  # in this call's own context (wire.start_eagerly)
            CREDENTIAL.set(self.credential)
        elif self.certificate is not None:
            CERTIFICATE.set(self.certificate)
        self._reply(await wire.dispatch(self.ops, call_id, op, args))

    # -- frames out: one write per loop turn, or per FRAME_ITEMS replies or FRAME_BYTES -----

    def _reply(self, item: Any) -> None:
        if self.closed:
            return
        packed = self._encode(item)
        if self.outbox and self._outbox_bytes + len(packed) > self.listener.max_frame_bytes - 8:
            self._send()  # the frame would be over the limit: what is pending leaves first
        self.outbox.append(packed)
        self._outbox_bytes += len(packed)
        if len(self.outbox) >= wire.FRAME_ITEMS or self._outbox_bytes >= wire.FRAME_BYTES:
            self._send()
            return
        if not self._flush_soon:
            self._flush_soon = True
            # busy: hold the frame a few loop turns so more replies join it (wire.HOLD_TURNS)
            turns = wire.HOLD_TURNS if len(self.running) > wire.BUSY_CALLS else 0
            self.loop.call_soon(self._flush, turns)

    def _encode(self, item: Any) -> bytes:
        """One reply (or change), packed. A reply that cannot be encoded or is over the frame
        limit alone becomes an error reply naming why; a change raises (the watch ends with it)."""
        try:
            packed = self._pack(item)
            if len(packed) > self.listener.max_frame_bytes - 8:  # room for the array header
                raise InvalidRequest(f"a reply of {len(packed)} bytes is over the frame limit of "
                                     f"{self.listener.max_frame_bytes} bytes; ask for less")
        except Exception as e:  # noqa: BLE001
            if self.kind != frames.CALLS:
                raise
            err = e if isinstance(e, OribusError) else OribusError(
                f"internal error: a result that cannot be encoded: {e}")
            log.error("the reply to call %r is replaced by an error: %s", item[0], err.message)
            packed = self._pack([item[0], wire.ERROR, err.to_dict()])
        return packed

    def _flush(self, hold: int = 0) -> None:
        if hold:
            self.loop.call_soon(self._flush, hold - 1)
            return
        self._flush_soon = False
        self._send()

    def _send(self) -> None:
        if self.closed or not self.outbox:
            return
        parts, self.outbox = self.outbox, []
        header = frames.array_header(len(parts))
        size, self._outbox_bytes = self._outbox_bytes + len(header), 0
        # the replies as they were packed, after one header: no copy of them into one body
        self.transport.writelines([frames.LENGTH.pack(size) + header, *parts])  # type: ignore[union-attr]
        self._counters["messages_out"] += 1

    def _write(self, value: Any) -> None:
        """One frame now (the hello's answer, the end of a watch, an error)."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(frames.pack_frame(value))

    # -- a watch -----------------------------------------------------------------------------

    async def _serve_watch(self, request: WatchRequest) -> None:
        stream: Any = None
        if self.credential is not None:  # this task's own context
            CREDENTIAL.set(self.credential)
        elif self.certificate is not None:
            CERTIFICATE.set(self.certificate)
        try:
            stream = await self.listener.watch(request)  # type: ignore[misc]
            self._write([])  # subscribed: every change made visible from now on follows
            async for change in stream:
                if self.closed:
                    return
                self._reply(change.to_wire())
                if self._drained is not None:  # the client reads slowly: wait for it
                    await self._drained
            self._flush()
            self._write(None)
            self.close()
        except OribusError as e:
            self.close(e)  # e.g. WatchLagged, HistoryTruncated: the client raises the same class
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.exception("watch failed")
            self.close(OribusError(f"internal error: {type(e).__name__}: {e}"))
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()
