"""The bus process: the client-facing gRPC service over a Bus (``oribus bus`` / ``oribus up``)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from oribus.bus.bus import Bus
from oribus.contract import ensure_subscribed
from oribus.messages import Change, WatchRequest
from oribus.rpc import bus_codec, wire
from oribus.rpc.mux_server import GrpcListener, mux_handlers
from oribus.tls import TlsConfig, server_credentials

log = logging.getLogger("oribus.rpc.bus_server")


class BusServer:
    """Serve ``bus`` on ``listen`` (``HOST:PORT``; port 0 picks a free port).

    With ``tls`` it serves mutual TLS only (clients need a certificate signed by
    the same CA); bad TLS files raise InvalidRequest here, naming the file.
    """

    def __init__(self, bus: Bus, listen: str, *, tls: TlsConfig | None = None) -> None:
        self.bus = bus
        self.listen = listen
        self.tls = tls
        self._listener = GrpcListener(
            listen,
            wire.BUS_SERVICE,
            mux_handlers(wire.BUS_SERVICE, wire.bind_ops(bus, bus_codec.BUS_OPS), watch=self._watch),
            credentials=server_credentials(tls) if tls is not None else None,
        )

    @property
    def port(self) -> int:
        return self._listener.port

    @property
    def address(self) -> str:
        return self._listener.address

    async def start(self) -> None:
        await self._listener.start()
        log.info("bus serving on %s", self.address)

    async def _watch(self, req: WatchRequest) -> AsyncIterator[Change]:
        """The stream of one Watch RPC, subscribed before the server acknowledges it."""
        stream = self.bus.watch(req)
        await ensure_subscribed(stream)
        return stream

    async def stop(self, grace: float = 2.0) -> None:
        """Stop serving; calls in flight get ``grace`` seconds. Idempotent."""
        await self._listener.stop(grace)
