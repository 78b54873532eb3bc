"""The shard server process: one Shard behind gRPC (``oribus shard``)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from oribus import wire
from oribus.bus.watch import ensure_subscribed
from oribus.mux import GrpcListener, mux_handlers, stop_signal_event
from oribus.shards.config import ShardConfig
from oribus.shards.shard import Shard

log = logging.getLogger("oribus.shard.server")


class ShardServer:
    """Serve one shard on ``listen`` (``HOST:PORT``; port 0 picks a free port)."""

    def __init__(self, config: ShardConfig, listen: str, *, epoch: int | None = None,
                 session_sweep_seconds: float = 5.0) -> None:
        self.config = config
        self.listen = listen
        self.epoch = epoch
        self.session_sweep_seconds = session_sweep_seconds
        self.shard: Shard | None = None
        self._listener: GrpcListener | None = None
        self._sweeper: asyncio.Task | None = None

    @property
    def port(self) -> int:
        return self._listener.port if self._listener is not None else 0

    @property
    def address(self) -> str:
        return f"{self.listen.rsplit(':', 1)[0]}:{self.port}"

    async def start(self) -> None:
        self.shard = await Shard.open(self.config, epoch=self.epoch)
        handler = mux_handlers(wire.SHARD_SERVICE, wire.bind_ops(self.shard, wire.SHARD_OPS), watch=self._watch)
        self._listener = GrpcListener(self.listen, wire.SHARD_SERVICE, handler)
        try:
            await self._listener.start()
        except BaseException:
            await self.shard.close()
            raise
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep())
        log.info("shard %d serving on %s (epoch %d)", self.config.shard_id, self.address, self.shard.epoch)

    async def _watch(self, req):
        """The stream of one Watch RPC, subscribed before the server acknowledges it."""
        stream = self.shard.watch(req.prefix, req.from_version, after=req.after, since=req.since)
        await ensure_subscribed(stream)
        return stream

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self.session_sweep_seconds)
            if self.shard is not None:
                self.shard.expire_sessions()

    async def stop(self, grace: float = 2.0) -> None:
        """Stop serving (letting calls in flight finish), then flush and close the shard."""
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._listener is not None:
            await self._listener.stop(grace)
        if self.shard is not None:
            await self.shard.close()


async def run_shard_server(shard_id: int, data_dir: Path, listen: str, *, ready_file: Path | None = None,
                           config: ShardConfig | None = None) -> None:
    """Run until SIGINT/SIGTERM: the body of ``oribus shard``."""
    cfg = config or ShardConfig(shard_id=shard_id, data_dir=data_dir)
    stop = stop_signal_event()
    server = ShardServer(cfg, listen)
    await server.start()
    if stop.is_set():
        await server.stop()
        return
    if ready_file is not None:
        tmp = ready_file.with_suffix(".tmp")
        tmp.write_text(server.address)
        tmp.replace(ready_file)
    print(f"oribus shard {shard_id} listening on {server.address}", flush=True)
    await stop.wait()
    await server.stop()
