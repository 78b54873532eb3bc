"""The bus process: the client-facing services over a Bus (``oribus bus`` / ``oribus up``).

The bus serves the same operations (``bus_codec.BUS_OPS``) and watch over gRPC, what
every client and tool speaks, and, with ``stream_listen``, over the stream transport
(``oribus.rpc.stream_server``), which the Python SDK switches to when it can reach it:
it asks the gRPC service for ``endpoints`` (``bus_codec.SERVER_OPS``) first.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from oribus.bus.bus import Bus
from oribus.bus.guarded import GuardedBus
from oribus.contract import ensure_subscribed
from oribus.messages import Change, WatchRequest
from oribus.rpc import bus_codec, wire
from oribus.rpc.mux_server import GrpcListener, mux_handlers
from oribus.rpc.stream_server import StreamListener
from oribus.tls import TlsConfig, server_credentials, server_ssl_context

log = logging.getLogger("oribus.rpc.bus_server")


class BusServer:
    """Serve ``bus`` over gRPC on ``listen`` and over the stream transport on ``stream_listen``
    (``HOST:PORT``; port 0 picks a free port; None: gRPC only).

    ``advertise_stream`` is the stream address clients are told (``endpoints``); by default
    ``:PORT``, the bound port on whatever host the client reached the bus at.

    With ``tls`` both listeners serve mutual TLS only (clients need a certificate signed
    by the same CA); bad TLS files raise InvalidRequest here, naming the file.

    With ``guarded`` (``--auth``: ``bus`` behind its access rules) every operation and watch
    goes through it: the caller's token (gRPC metadata, or the stream hello) or agent
    certificate is checked, then the rules. The HTTP gateway gets the same ``GuardedBus``,
    so that a session's owner is one record whatever transport its calls come over.
    """

    def __init__(self, bus: Bus, listen: str, *, tls: TlsConfig | None = None, stream_listen: str | None = None,
                 advertise_stream: str | None = None, guarded: GuardedBus | None = None) -> None:
        self.bus = bus
        self.served: Bus | GuardedBus = bus if guarded is None else guarded
        self.listen = listen
        self.tls = tls
        self.advertise_stream = advertise_stream
        self.grpc_counters: dict[str, int] = {}
        ops = wire.bind_ops(self.served, bus_codec.BUS_OPS)
        ops["endpoints"] = self._endpoints
        self._listener = GrpcListener(
            listen,
            wire.BUS_SERVICE,
            mux_handlers(wire.BUS_SERVICE, ops, watch=self._watch, counters=self.grpc_counters),
            credentials=server_credentials(tls) if tls is not None else None,
        )
        self._stream: StreamListener | None = None
        if stream_listen:
            self._stream = StreamListener(stream_listen, wire.BUS_SERVICE, ops, watch=self._watch,
                                          ssl=server_ssl_context(tls) if tls is not None else None)

    @property
    def port(self) -> int:
        return self._listener.port

    @property
    def address(self) -> str:
        return self._listener.address

    @property
    def stream_address(self) -> str:
        """The bound address of the stream listener ("" without one)."""
        return self._stream.address if self._stream is not None else ""

    @property
    def stream_counters(self) -> dict[str, int]:
        """Connections, calls and messages each way of the stream listener (empty without one)."""
        return dict(self._stream.counters) if self._stream is not None else {}

    def advertised_stream(self) -> str:
        """What ``endpoints`` tells clients: "" without a stream listener."""
        if self._stream is None or not self._stream.port:
            return ""
        return self.advertise_stream or f":{self._stream.port}"

    async def start(self) -> None:
        if self._stream is not None:  # first: once gRPC says SERVING, endpoints may name it
            await self._stream.start()
        try:
            await self._listener.start()
        except BaseException:
            if self._stream is not None:
                await self._stream.stop(0)
            raise
        stream = f" and {self.stream_address} (stream)" if self._stream is not None else ""
        log.info("bus serving on %s (gRPC)%s", self.address, stream)

    async def _endpoints(self, args: object) -> dict:
        return bus_codec.enc_endpoints(self.advertised_stream())

    async def _watch(self, req: WatchRequest) -> AsyncIterator[Change]:
        """The stream of one watch, subscribed before the server acknowledges it."""
        stream = self.served.watch(req)
        await ensure_subscribed(stream)
        return stream

    async def stop(self, grace: float = 2.0) -> None:
        """Stop serving; calls in flight get ``grace`` seconds. Idempotent."""
        if self._stream is not None:
            await asyncio.gather(self._stream.stop(grace), self._listener.stop(grace))
        else:
            await self._listener.stop(grace)
