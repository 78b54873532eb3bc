"""The shard server process: one Shard behind gRPC (``oribus shard``)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from oribus import wire
from oribus.contract import ensure_subscribed
from oribus.datadir_lock import DataDirLock
from oribus.errors import InvalidRequest, Unavailable
from oribus.meta.cluster import ClaimRefused, ClusterMeta, ShardClaim
from oribus.mux import GrpcListener, mux_handlers, stop_signal_event
from oribus.shards.config import ShardConfig
from oribus.shards.shard import Shard
from oribus.tls import TlsConfig, server_credentials

log = logging.getLogger("oribus.shard.server")


class ShardServer:
    """Serve one shard on ``listen`` (``HOST:PORT``; port 0 picks a free port).

    With ``tls`` it serves mutual TLS only: the bus must present a client
    certificate signed by the same CA.
    """

    def __init__(self, config: ShardConfig, listen: str, *, epoch: int | None = None,
                 session_sweep_seconds: float = 5.0, tls: TlsConfig | None = None,
                 dir_lock: DataDirLock | None = None) -> None:
        self.config = config
        self.dir_lock = dir_lock  # the data directory's lock if the caller took it (else Shard.open takes it)
        self.listen = listen
        self.tls = tls
        self.epoch = epoch
        self.session_sweep_seconds = session_sweep_seconds
        self.shard: Shard | None = None
        self._listener: GrpcListener | None = None
        self._sweeper: asyncio.Task | None = None
        self.fenced: str = ""  # why this process may no longer serve its shard ("" while it may)

    @property
    def port(self) -> int:
        return self._listener.port if self._listener is not None else 0

    @property
    def address(self) -> str:
        return f"{self.listen.rsplit(':', 1)[0]}:{self.port}"

    async def start(self) -> None:
        # bad TLS files refuse the start before the shard is opened (the error names the file)
        credentials = server_credentials(self.tls) if self.tls is not None else None
        self.shard = await Shard.open(self.config, epoch=self.epoch, dir_lock=self.dir_lock)
        ops = {name: self._fenced(op) for name, op in wire.bind_ops(self.shard, wire.SHARD_OPS).items()}
        handler = mux_handlers(wire.SHARD_SERVICE, ops, watch=self._watch)
        self._listener = GrpcListener(self.listen, wire.SHARD_SERVICE, handler, credentials=credentials)
        try:
            await self._listener.start()
        except BaseException:
            await self.shard.close()
            raise
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep())
        log.info("shard %d serving on %s (epoch %d)", self.config.shard_id, self.address, self.shard.epoch)

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
            expected = args.get(wire.FENCE) if isinstance(args, dict) else None
            if expected is not None and expected != shard.epoch:
                raise Unavailable(
                    f"shard {shard.shard_id} is at epoch {shard.epoch}, the caller expects epoch {expected}: "
                    "one of the two has a stale view of the cluster; refusing",
                    shard=shard.shard_id, epoch=shard.epoch, expected=expected,
                )
            return await handler(args)

        fenced.__name__ = handler.__name__
        return fenced

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


async def _claim(meta: ClusterMeta, shard_id: int, address: str, wait: float) -> ShardClaim:
    deadline = asyncio.get_running_loop().time() + wait
    told = False
    while True:
        try:
            return await meta.claim_shard(shard_id, address)
        except ClaimRefused as e:
            if asyncio.get_running_loop().time() >= deadline:
                raise
            if not told:
                log.warning("%s; waiting up to %.0fs for that claim to expire", e, wait)
                told = True
            await asyncio.sleep(0.25)


class ClaimLost(Exception):
    """This process lost its claim on its shard id and stopped serving it."""


async def run_shard_server(shard_id: int, data_dir: Path, listen: str, *, ready_file: Path | None = None,
                           config: ShardConfig | None = None, tls: TlsConfig | None = None,
                           meta: ClusterMeta | None = None, advertise: str | None = None,
                           claim_wait: float = 0.0) -> None:
    """Run until SIGINT/SIGTERM: the body of ``oribus shard``.

    The data directory is locked first (``<data_dir>/LOCK``): while another live
    process has it open, this one raises ``DataDirLocked`` and touches nothing.

    With ``meta`` (cluster mode) the shard id is claimed BEFORE the data is
    opened — a second process for the same id is refused (ClaimRefused) and
    never touches the WAL — and the claim's revision is the shard's epoch. The
    claim is advertised at ``advertise`` (default: the bound address). If the
    claim is lost the server is fenced, stops, and ClaimLost is raised.

    ``claim_wait``: how long to keep trying while another claim holds the id —
    after a kill -9 the dead process's lease lives on for up to its TTL, and a
    live duplicate holds it for good; either way nothing is opened meanwhile.
    """
    cfg = config or ShardConfig(shard_id=shard_id, data_dir=data_dir)
    # The data directory first: a second process on it is refused (DataDirLocked) before it
    # claims the id in etcd or binds a port; held until this process ends.
    with DataDirLock.acquire(cfg.data_dir) as dir_lock:
        await _serve_shard(shard_id, cfg, listen, dir_lock, ready_file=ready_file, tls=tls, meta=meta,
                           advertise=advertise, claim_wait=claim_wait)


async def _serve_shard(shard_id: int, cfg: ShardConfig, listen: str, dir_lock: DataDirLock, *,
                       ready_file: Path | None, tls: TlsConfig | None, meta: ClusterMeta | None,
                       advertise: str | None, claim_wait: float) -> None:
    stop = stop_signal_event()
    claim = None
    if meta is not None:
        cluster = await meta.config()
        if not 0 <= shard_id < cluster.shards:
            raise InvalidRequest(f"shard id {shard_id} is outside the cluster's 0..{cluster.shards - 1}")
        claim = await _claim(meta, shard_id, advertise or listen, claim_wait)
    server = ShardServer(cfg, listen, tls=tls, epoch=claim.epoch if claim is not None and claim.epoch else None,
                         dir_lock=dir_lock)
    try:
        await server.start()
        if claim is not None and meta is not None and advertise is None:
            await meta.update_address(claim, server.address)
        if stop.is_set():
            return
        if ready_file is not None:
            tmp = ready_file.with_suffix(".tmp")
            tmp.write_text(server.address)
            tmp.replace(ready_file)
        epoch = server.shard.epoch if server.shard is not None else 0
        print(f"oribus shard {shard_id} listening on {server.address} (epoch {epoch})", flush=True)
        waits = {asyncio.ensure_future(stop.wait())}
        if claim is not None:
            waits.add(asyncio.ensure_future(claim.lost.wait()))
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for w in waits:
            w.cancel()
        if claim is not None and claim.lost.is_set():
            server.fence(claim.reason)
            raise ClaimLost(claim.reason)
    finally:
        await server.stop()
        if claim is not None and meta is not None and not claim.lost.is_set():
            await meta.release(claim)
