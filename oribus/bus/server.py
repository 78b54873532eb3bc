"""The bus process: the client-facing gRPC service over a Bus (``oribus bus`` / ``oribus up``)."""

from __future__ import annotations

import asyncio
import logging

from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from oribus import wire
from oribus.bus.bus import Bus
from oribus.bus.recovery import Recovery
from oribus.bus.watch import ensure_subscribed
from oribus.mux import CHANNEL_OPTIONS, mux_handlers

log = logging.getLogger("oribus.bus.server")


class BusServer:
    """Serve ``bus`` on ``listen`` (``HOST:PORT``; port 0 picks a free port).

    With ``recovery`` it also resolves abandoned transactions in the background
    (the embedded engine runs its own; a bus over shard servers needs this one).
    """

    def __init__(self, bus: Bus, listen: str, *, recovery: Recovery | None = None) -> None:
        self.bus = bus
        self.listen = listen
        self.recovery = recovery
        self.port = 0
        self._server: aio.Server | None = None
        self._health = health.aio.HealthServicer()
        self._recovery_task: asyncio.Task | None = None

    @property
    def address(self) -> str:
        host = self.listen.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    async def start(self) -> None:
        server = aio.server(options=CHANNEL_OPTIONS)
        server.add_generic_rpc_handlers(
            [mux_handlers(wire.BUS_SERVICE, wire.bind_ops(self.bus, wire.BUS_OPS), watch=self._watch)]
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        self.port = server.add_insecure_port(self.listen)
        if not self.port:
            raise OSError(f"cannot listen on {self.listen}")
        await server.start()
        await self._health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self._health.set(wire.BUS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        self._server = server
        if self.recovery is not None:
            await self.recovery.run_once()  # orphans of a bus that died (older than the expiry)
            self._recovery_task = asyncio.get_running_loop().create_task(self.recovery.run_forever())
        log.info("bus serving on %s", self.address)

    async def _watch(self, req):
        """The stream of one Watch RPC, subscribed before the server acknowledges it."""
        stream = self.bus.watch(req.prefix, req.from_version, after=req.after, since=req.since)
        await ensure_subscribed(stream)
        return stream

    async def stop(self, grace: float = 2.0) -> None:
        if self._recovery_task is not None:
            self._recovery_task.cancel()
        if self._server is not None:
            await self._health.enter_graceful_shutdown()
            await self._server.stop(grace)
            self._server = None
