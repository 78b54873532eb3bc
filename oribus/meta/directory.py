"""Where each shard is: the bus's view of the cluster metadata (cluster mode).

``ShardDirectory`` follows ``ClusterMeta.watch_shards()`` and keeps the bus's
shard table in step: one client per shard id (``oribus.rpc.shard_client``: over
the shard's stream listener if its record has one, else gRPC), created for the
addresses and **epoch** of the shard's current claim. When a shard's claim
changes (a restart claims again with a new epoch, or the address moves) the
client is replaced, so every later call goes to the new process and carries
its epoch (the shard refuses a call naming another epoch). Sessions that had
deliveries on the old process hold tokens with the old epoch, so their next
commit fails with SessionExpired — closed, not with less validation.

A shard id with no claim is served by ``UnregisteredShard``, which answers
every call with Unavailable (readiness reports it down). If etcd cannot be
reached the directory keeps the map it has (``EtcdMeta.watch_shards`` logs it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

from oribus.contract import ShardService
from oribus.errors import Unavailable
from oribus.messages import Change, WatchRequest
from oribus.meta.cluster_meta import ClusterMeta, ShardRecord
from oribus.shards.service import ShardServiceByCalls

log = logging.getLogger("oribus.meta.directory")

ClientFactory = Callable[[ShardRecord], ShardService]


class UnregisteredShard(ShardServiceByCalls):
    """A shard id no server has claimed (yet): every call is Unavailable."""

    def __init__(self, shard_id: int) -> None:
        self.shard_id = shard_id
        self.epoch = 0

    def _down(self) -> Unavailable:
        return Unavailable(f"shard {self.shard_id} has no registered server", shard=self.shard_id)

    async def _call(self, op: str, *params: object) -> object:
        raise self._down()

    def watch(self, request: WatchRequest) -> AsyncIterator[Change]:
        raise self._down()

    async def close(self) -> None:
        pass


class ShardDirectory:
    """Keeps ``shards`` (the bus's table, changed in place) in step with ``meta``."""

    def __init__(self, meta: ClusterMeta, shards: dict[int, ShardService], shard_ids: list[int],
                 factory: ClientFactory) -> None:
        self.meta = meta
        self.shards = shards
        self.factory = factory
        self.records: dict[int, ShardRecord] = {}
        self.changes = 0  # how many times a shard's server was replaced
        for sid in shard_ids:
            shards.setdefault(sid, UnregisteredShard(sid))
        self._task: asyncio.Task | None = None
        self._first = asyncio.Event()

    async def start(self, wait: float = 0.0) -> None:
        """Follow the metadata; with ``wait``, wait up to that long for the first map."""
        self._task = asyncio.get_running_loop().create_task(self._follow())
        if wait:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._first.wait(), wait)

    async def _follow(self) -> None:
        while True:
            try:
                async for records in self.meta.watch_shards():
                    await self.apply(records)
                    self._first.set()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("following the shard map failed; retrying")
                await asyncio.sleep(1.0)

    async def apply(self, records: dict[int, ShardRecord]) -> None:
        for sid, rec in records.items():
            if sid not in self.shards:
                log.warning("shard %d is registered but not in the cluster's configuration; ignored", sid)
                continue
            if self.records.get(sid) == rec:
                continue
            old = self.shards[sid]
            self.shards[sid] = self.factory(rec)
            self.records[sid] = rec
            self.changes += 1
            log.warning("shard %d is now %s%s at epoch %d", sid, rec.address,
                        f" (stream {rec.stream})" if rec.stream else "", rec.epoch)
            close = getattr(old, "close", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    await close()
        for sid in set(self.records) - set(records):
            log.error("shard %d lost its registration (its lease expired); keeping %s until it is claimed again",
                      sid, self.records[sid].address)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for shard in self.shards.values():
            close = getattr(shard, "close", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    await close()
