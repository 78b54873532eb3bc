"""The shard process: the body of ``oribus shard``.

Locks the data directory, claims the shard id in the cluster metadata (cluster mode),
serves the shard (``oribus.rpc.shard_server.ShardServer``) until SIGINT/SIGTERM or until
the claim is lost, then stops and releases the claim.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from oribus.datadir_lock import DataDirLock
from oribus.errors import InvalidRequest
from oribus.hosts.lifecycle import stop_signal_event
from oribus.meta.cluster_meta import ClaimRefused, ClusterMeta, ShardClaim
from oribus.rpc.shard_server import ShardServer
from oribus.shards.config import ShardConfig
from oribus.tls import TlsConfig

log = logging.getLogger("oribus.hosts.shard")


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
        # ready (the ready file, the banner, SERVING) once it takes writes: after its restart grace
        ready, stopping = asyncio.ensure_future(server.ready()), asyncio.ensure_future(stop.wait())
        await asyncio.wait({ready, stopping}, return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        stopping.cancel()
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
