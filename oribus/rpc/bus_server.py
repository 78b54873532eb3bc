"""The bus process: the client-facing gRPC service over a Bus (``oribus bus`` / ``oribus up``)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from oribus.bus.bus import Bus
from oribus.bus.sweep import TxnSweep
from oribus.contract import ensure_subscribed
from oribus.messages import Change, WatchRequest
from oribus.rpc import bus_codec, wire
from oribus.rpc.mux_server import GrpcListener, mux_handlers
from oribus.tls import TlsConfig, server_credentials

log = logging.getLogger("oribus.rpc.bus_server")


class BusServer:
    """Serve ``bus`` on ``listen`` (``HOST:PORT``; port 0 picks a free port).

    With ``sweep`` it also resolves abandoned transactions in the background
    (the embedded engine runs its own; a bus over shard servers needs this one).
    With ``tls`` it serves mutual TLS only (clients need a certificate signed by
    the same CA); bad TLS files raise InvalidRequest here, naming the file.
    """

    def __init__(self, bus: Bus, listen: str, *, sweep: TxnSweep | None = None,
                 tls: TlsConfig | None = None) -> None:
        self.bus = bus
        self.listen = listen
        self.sweep = sweep
        self.tls = tls
        self._listener = GrpcListener(
            listen,
            wire.BUS_SERVICE,
            mux_handlers(wire.BUS_SERVICE, wire.bind_ops(bus, bus_codec.BUS_OPS), watch=self._watch),
            credentials=server_credentials(tls) if tls is not None else None,
        )
        self._sweep_task: asyncio.Task | None = None

    @property
    def port(self) -> int:
        return self._listener.port

    @property
    def address(self) -> str:
        return self._listener.address

    async def start(self) -> None:
        await self._listener.start()
        if self.sweep is not None:  # in the background: serving does not wait for it
            self._sweep_task = asyncio.get_running_loop().create_task(self.sweep.run_forever())
        log.info("bus serving on %s", self.address)

    async def _watch(self, req: WatchRequest) -> AsyncIterator[Change]:
        """The stream of one Watch RPC, subscribed before the server acknowledges it."""
        stream = self.bus.watch(req)
        await ensure_subscribed(stream)
        return stream

    async def stop(self, grace: float = 2.0) -> None:
        if self._sweep_task is not None:
            self._sweep_task.cancel()
        await self._listener.stop(grace)
