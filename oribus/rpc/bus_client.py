"""A bus reached over the network: ``RemoteBus``, the ``BusService`` behind ``oribus.connect``.

``BusByCalls`` offers the bus methods a session calls (read, commit, history, forget,
reset, stats, scan) as calls of ``bus_codec.BUS_OPS``; ``RemoteBus`` sends them over one of
two transports carrying the same calls and replies, so a remote session has exactly the
embedded API and semantics whichever it uses:

``grpc``    one multiplexed gRPC stream (``oribus.rpc.mux_client``): what every client
            and tool speaks, served by every bus;
``stream``  one connection of the stream transport (``oribus.rpc.stream_client``:
            length-prefixed msgpack frames over TCP or TLS), several times cheaper per
            call; ``target`` is then the bus's stream address;
``auto``    (the default) gRPC first, to ask the bus for its ``endpoints``; when it has a
            stream listener the client can reach, every later call goes over it, else
            over gRPC (a client that cannot reach it logs why, once). A call that finds
            the stream broken fails with Unavailable, as over gRPC, and the next call
            asks again, so a restarted bus is found on its new port.

The simulated network has its own ``BusByCalls``.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc

from oribus import tracing
from oribus.aio import take_outcome
from oribus.auth.credential import METADATA_KEY, authorization
from oribus.contract import (
    BusService,
    CommitRequest,
    CommitResult,
    Entry,
    ReadResult,
    ensure_subscribed,
)
from oribus.errors import InvalidRequest, OribusError, Unavailable
from oribus.messages import Change, ReadItem, WatchRequest
from oribus.rpc import bus_codec, wire
from oribus.rpc.mux_client import MuxClient
from oribus.rpc.stream_client import CONNECT_TIMEOUT, StreamClient, split_address
from oribus.tls import TlsConfig, channel_credentials, client_ssl_context
from oribus.types import DEFAULT_SCAN_LIMIT, SessionRef

log = logging.getLogger("oribus.rpc.bus_client")

TRANSPORTS = ("auto", "grpc", "stream")
DEFAULT_TRANSPORT = "auto"
SWITCH_TIMEOUT = 2.0  # seconds ``auto`` gives the stream listener to answer before it stays on gRPC


class BusByCalls(BusService):
    """The bus methods a session calls (``BusService``), each one call ``_call(op, *params)`` of
    ``bus_codec.BUS_OPS``: the shape of every remote bus (gRPC, the simulated network),
    which differ only in how a call travels (and in watch)."""

    @abc.abstractmethod
    async def _call(self, op: str, *params: Any) -> Any:
        """Send one call of ``bus_codec.BUS_OPS`` and return its decoded result."""

    async def read(self, session: SessionRef, keys: list[str], record: bool = True,
                   only_new: bool = False) -> ReadResult:
        return await self._call("read", session, keys, record, only_new)

    async def commit(self, req: CommitRequest) -> CommitResult:
        return await self._call("commit", req)

    async def history(self, key: str, limit: int | None = None) -> list[Entry]:
        return await self._call("history", key, limit)

    async def forget(self, session: SessionRef, keys: list[str]) -> None:
        await self._call("forget", session, keys)

    async def reset(self, session: SessionRef) -> None:
        await self._call("reset", session)

    async def stats(self) -> dict:
        return await self._call("stats")

    async def scan(self, prefix: str = "", after: str = "", limit: int = DEFAULT_SCAN_LIMIT) -> list[ReadItem]:
        return await self._call("scan", prefix, after, limit)


class RemoteBus(BusByCalls):
    """A bus reached at ``target`` (``HOST:PORT``) over ``transport`` (see the module
    docstring); over mutual TLS with ``tls``. ``credentials`` (gRPC channel credentials
    of one's own) keep every call on gRPC under ``auto``: the stream transport takes
    its TLS from ``tls``."""

    def __init__(self, target: str = wire.DEFAULT_BUS_ADDRESS, *, credentials: grpc.ChannelCredentials | None = None,
                 timeout: float = wire.DEFAULT_CALL_TIMEOUT, tls: TlsConfig | str | Path | None = None,
                 transport: str = DEFAULT_TRANSPORT, token: str | None = None) -> None:
        if transport not in TRANSPORTS:
            raise InvalidRequest(f"the transport is one of {', '.join(TRANSPORTS)}, not {transport!r}")
        if transport == "stream" and credentials is not None:
            raise InvalidRequest("gRPC credentials do not apply to the stream transport: pass tls= instead")
        self.target = target
        self.transport = transport
        self.timeout = timeout
        self.token = token  # the agent's credential, on every call (specs/auth.md §2)
        self._tls = TlsConfig.of(tls)
        if self._tls is not None and credentials is None:
            credentials = channel_credentials(self._tls)
        self._custom_credentials = credentials is not None and self._tls is None
        self.mux = MuxClient(target, wire.BUS_SERVICE, credentials=credentials, timeout=timeout,
                             options=self._tls.channel_options() if self._tls is not None else (),
                             metadata=((METADATA_KEY, authorization(token)),) if token else ())
        self.stream: StreamClient | None = None  # set once the calls go over the stream transport
        self._switch: asyncio.Task | None = None  # auto: the endpoints question in flight
        self._closing: set[asyncio.Task] = set()  # streams given up, being closed
        self._settled = transport == "grpc"  # auto: endpoints asked and answered
        if transport == "stream":
            self.stream = self._stream_client(target)
            self._settled = True

    @property
    def using(self) -> str:
        """The transport calls go over now: "grpc" or "stream" ("auto" until it is known)."""
        if self.stream is not None:
            return "stream"
        return "grpc" if self._settled else "auto"

    def _stream_client(self, target: str, connect_timeout: float | None = None) -> StreamClient:
        tls = self._tls
        return StreamClient(target, wire.BUS_SERVICE, ssl=client_ssl_context(tls) if tls is not None else None,
                            server_hostname=tls.ssl_target_name_override if tls is not None else None,
                            timeout=self.timeout, connect_timeout=connect_timeout or CONNECT_TIMEOUT,
                            token=self.token)

    async def _call(self, op: str, *params: Any) -> Any:
        if not self._settled:
            await self._settle()
        o = bus_codec.BUS_OPS[op]
        args = tracing.inject(o.enc_args(*params))  # the SDK's span, parent of the bus's
        stream = self.stream
        if stream is None:
            return o.dec_result(await self.mux.call(op, args))
        try:
            return o.dec_result(await stream.call(op, args))
        except Unavailable:
            if self.transport == "auto" and self.stream is stream and not stream.connected:
                self._forget_stream()  # the connection is gone: the next call asks the bus where it is now
            raise

    def _forget_stream(self) -> None:
        stream, self.stream, self._settled = self.stream, None, False
        if stream is not None:
            closing = asyncio.get_running_loop().create_task(stream.close())
            self._closing.add(closing)  # a strong reference until it is done
            closing.add_done_callback(self._closing.discard)

    async def _settle(self) -> None:
        """``auto``: ask the bus for its endpoints (once, whoever asks first) and switch."""
        task = self._switch
        if task is None:
            task = self._switch = asyncio.get_running_loop().create_task(self._ask_endpoints())
            task.add_done_callback(lambda _: setattr(self, "_switch", None))
            task.add_done_callback(take_outcome)
        await asyncio.shield(task)

    async def _ask_endpoints(self) -> None:
        if self._custom_credentials:
            self._settled = True
            return
        try:
            advertised = await self.mux.call_op(bus_codec.SERVER_OPS, "endpoints")
        except Unavailable:
            raise  # the bus is down or unreachable: this call fails as it would over gRPC
        except OribusError as e:  # a bus that predates the endpoints question
            log.debug("bus at %s does not say its endpoints (%s): calls stay on gRPC", self.target, e)
            self._settled = True
            return
        if not advertised:
            self._settled = True
            return
        address = self._reachable(advertised)
        stream = self._stream_client(address, connect_timeout=min(SWITCH_TIMEOUT, self.timeout))
        try:
            await stream.connect()
        except OribusError as e:
            await stream.close()
            log.warning("the bus at %s offers its stream transport at %s, which this client cannot use (%s); "
                        "calls stay on gRPC", self.target, address, e.message)
            self._settled = True
            return
        except BaseException:  # closed meanwhile (cancelled): leave nothing open
            await stream.close()
            raise
        self.stream = stream
        self._settled = True

    def _reachable(self, advertised: str) -> str:
        """The stream address to dial: ``:PORT`` means the host this client reached the bus at."""
        if advertised.startswith(":"):
            host, _ = split_address(self.target)
            host = f"[{host}]" if ":" in host else host
            return f"{host}{advertised}"
        return advertised

    def watch(self, request: WatchRequest) -> AsyncIterator[Change]:
        if self.stream is not None:
            return self.stream.watch(request)
        if self._settled:
            return self.mux.watch(request)
        return _WatchAfterSettling(self, request)

    async def close(self) -> None:
        switch = self._switch
        if switch is not None:
            switch.cancel()
            with contextlib.suppress(BaseException):
                await switch
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
        if self.stream is not None:
            await self.stream.close()
        await self.mux.close()


class _WatchAfterSettling:
    """A watch opened before ``auto`` knew its transport: it asks first, then watches over
    whichever transport the calls use."""

    def __init__(self, bus: RemoteBus, request: WatchRequest) -> None:
        self._bus = bus
        self._request = request
        self._inner: AsyncIterator[Change] | None = None

    async def subscribed(self) -> None:
        if self._inner is None:
            await self._bus._settle()  # noqa: SLF001 - the watch belongs to the bus's transport
            self._inner = self._bus.watch(self._request)
        await ensure_subscribed(self._inner)

    def __aiter__(self) -> _WatchAfterSettling:
        return self

    async def __anext__(self) -> Change:
        await self.subscribed()
        assert self._inner is not None
        return await self._inner.__anext__()

    async def aclose(self) -> None:
        inner = self._inner
        if inner is not None:
            close = getattr(inner, "aclose", None)
            if close is not None:
                await close()
