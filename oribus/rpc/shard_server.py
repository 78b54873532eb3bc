"""One Shard behind gRPC and the stream transport (``oribus.v1.Shard``), epoch-fenced, with its
session upkeep; ``oribus shard`` runs it (``oribus.hosts.shard``).

Both listeners serve the same fenced handlers: the bus uses the stream one when the shard
advertises it (``oribus.rpc.shard_client.shard_client``); gRPC stays for tools, for buses
told ``--shard-transport grpc``, and for the standard health service the probes ask.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from oribus.contract import ensure_subscribed
from oribus.datadir_lock import DataDirLock
from oribus.errors import Unavailable
from oribus.messages import Change, WatchRequest
from oribus.rpc import shard_codec, wire
from oribus.rpc.mux_server import GrpcListener, mux_handlers
from oribus.rpc.stream_server import StreamListener
from oribus.shards.config import ShardConfig
from oribus.shards.shard import Shard
from oribus.tls import TlsConfig, server_credentials, server_ssl_context

log = logging.getLogger("oribus.shard.server")


class ShardServer:
    """Serve one shard over gRPC on ``listen`` and over the stream transport on
    ``stream_listen`` (``HOST:PORT``; port 0 picks a free port; None: no stream listener).

    With ``tls`` both serve mutual TLS only: the bus must present a client
    certificate signed by the same CA.
    """

    def __init__(self, config: ShardConfig, listen: str, *, epoch: int | None = None,
                 session_sweep_seconds: float = 5.0, tls: TlsConfig | None = None,
                 dir_lock: DataDirLock | None = None, stream_listen: str | None = None) -> None:
        self.config = config
        self.dir_lock = dir_lock  # the data directory's lock if the caller took it (else Shard.open takes it)
        self.listen = listen
        self.stream_listen = stream_listen
        self.tls = tls
        self.epoch = epoch
        self.session_sweep_seconds = session_sweep_seconds
        self.shard: Shard | None = None
        self._listener: GrpcListener | None = None
        self._stream: StreamListener | None = None
        self._grpc_counters: dict[str, int] = {}  # the gRPC Stream's calls and messages
        self._sweeper: asyncio.Task | None = None
        self._ready: asyncio.Task | None = None  # reports SERVING once the restart grace is over
        self.fenced: str = ""  # why this process may no longer serve its shard ("" while it may)

    @property
    def port(self) -> int:
        return self._listener.port if self._listener is not None else 0

    @property
    def address(self) -> str:
        return f"{self.listen.rsplit(':', 1)[0]}:{self.port}"

    @property
    def stream_address(self) -> str:
        """The bound address of the stream listener ("" without one)."""
        return self._stream.address if self._stream is not None else ""

    async def start(self) -> None:
        # bad TLS files refuse the start before the shard is opened (the error names the file)
        credentials = server_credentials(self.tls) if self.tls is not None else None
        context = server_ssl_context(self.tls) if self.tls is not None and self.stream_listen else None
        self.shard = await Shard.open(self.config, epoch=self.epoch, dir_lock=self.dir_lock)
        ops = {name: self._fenced(op) for name, op in wire.bind_ops(self.shard, shard_codec.SHARD_OPS).items()}
        ops["stats"] = self._fenced(self._stats)
        handler = mux_handlers(wire.SHARD_SERVICE, ops, watch=self._watch, counters=self._grpc_counters)
        self._listener = GrpcListener(self.listen, wire.SHARD_SERVICE, handler, credentials=credentials)
        if self.stream_listen:
            self._stream = StreamListener(self.stream_listen, wire.SHARD_SERVICE, ops, watch=self._watch,
                                          ssl=context)
        grace = self.shard.core.grace_left()
        try:
            # During its restart grace the shard serves reads, validations and what prepared
            # transactions need, but takes no write (PROTOCOL.md §5.8): not ready until then.
            if self._stream is not None:
                await self._stream.start()
            await self._listener.start(serving=grace == 0)
        except BaseException:
            if self._stream is not None:
                await self._stream.stop(0)
            await self.shard.close()
            raise
        loop = asyncio.get_running_loop()
        self._sweeper = loop.create_task(self._sweep())
        if grace:
            log.info("shard %d takes no write for %.2fs (restart grace: read leases it may have granted "
                     "before it started)", self.config.shard_id, grace)
            self._ready = loop.create_task(self._serving_after(grace))
        stream = f" and {self.stream_address} (stream)" if self._stream is not None else ""
        log.info("shard %d serving on %s (gRPC)%s (epoch %d)", self.config.shard_id, self.address, stream,
                 self.shard.epoch)

    async def _stats(self, args: Any) -> Any:
        """The shard's stats plus its listeners' counters (calls and messages each way: how
        well the bus's calls are batched), under ``transport``."""
        assert self.shard is not None, "start() opens the shard before it serves"
        out = await self.shard.stats()
        transport = {"grpc": dict(self._grpc_counters)}
        if self._stream is not None:
            transport["stream"] = dict(self._stream.counters)
        return {**out, "transport": transport}

    async def _serving_after(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        if self._listener is not None:
            await self._listener.serving()

    async def ready(self) -> None:
        """Return once the shard takes writes (its restart grace is over) and says so."""
        if self._ready is not None:
            await asyncio.shield(self._ready)

    def fence(self, reason: str) -> None:
        """Refuse every request from now on (the claim on this shard id is lost)."""
        self.fenced = reason

    def _fenced(self, handler: Callable[[Any], Awaitable[Any]]) -> Callable[[Any], Awaitable[Any]]:
        """Check the fencing token: a request naming another epoch is for another process."""
        shard = self.shard
        assert shard is not None

        async def fenced(args: Any) -> Any:
            if self.fenced:
                raise Unavailable(f"shard {shard.shard_id}: {self.fenced}", shard=shard.shard_id)
            expected = args.get(shard_codec.FENCE) if isinstance(args, dict) else None
            if expected is not None and expected != shard.epoch:
                raise Unavailable(
                    f"shard {shard.shard_id} is at epoch {shard.epoch}, the caller expects epoch {expected}: "
                    "one of the two has a stale view of the cluster; refusing",
                    shard=shard.shard_id, epoch=shard.epoch, expected=expected,
                )
            return await handler(args)

        fenced.__name__ = handler.__name__
        return fenced

    async def _watch(self, req: WatchRequest) -> AsyncIterator[Change]:
        """The stream of one Watch RPC, subscribed before the server acknowledges it."""
        assert self.shard is not None, "start() opens the shard before it serves"
        stream = self.shard.watch(req)
        await ensure_subscribed(stream)
        return stream

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self.session_sweep_seconds)
            if self.shard is not None:
                self.shard.expire_sessions()
                self.shard.expire_leases()

    async def stop(self, grace: float = 2.0) -> None:
        """Stop serving (letting calls in flight finish), then flush and close the shard."""
        sweeper, self._sweeper = self._sweeper, None
        if sweeper is not None:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper
        if self._ready is not None:
            self._ready.cancel()
        stops = [listener.stop(grace) for listener in (self._listener, self._stream) if listener is not None]
        await asyncio.gather(*stops)
        if self.shard is not None:
            await self.shard.close()
