"""Background upkeep of a bus: resolve abandoned transactions, release kept decisions.

A prepared transaction whose coordinator went silent is resolved through its
primary (which aborts it if it has no outcome). A commit decision a primary
keeps is released once no participant has the transaction prepared any more.
Both go through ShardService only, so the same code serves in-process shards
and shard servers.
"""

from __future__ import annotations

import asyncio
import logging

from oribus.bus.bus import Bus
from oribus.errors import OribusError

log = logging.getLogger("oribus.bus.sweep")


class TxnSweep:
    def __init__(self, bus: Bus, *, txn_expiry_seconds: float = 10.0, interval: float = 1.0) -> None:
        self.bus = bus
        self.txn_expiry_seconds = txn_expiry_seconds
        self.interval = interval

    async def resolve_expired(self, older_than: float) -> int:
        """Resolve two-phase transactions prepared longer than ``older_than`` seconds ago."""
        n = 0
        for sid, shard in self.bus.shards.items():
            try:
                txns = await shard.expired(older_than)
            except OribusError as e:
                log.info("shard %d unreachable for the sweep: %s", sid, e)
                continue
            for txn in txns:
                try:
                    await self.bus.coordinator.recover(sid, txn)
                    n += 1
                except OribusError as e:
                    log.warning("could not resolve %s on shard %d yet: %s", txn.txn_id, sid, e)
        return n

    async def release_settled(self) -> int:
        """Release kept decisions no participant still waits for."""
        n = 0
        for sid, shard in self.bus.shards.items():
            try:
                txns = await shard.unreleased()
            except OribusError:
                continue
            results = await asyncio.gather(
                *(self.bus.coordinator.release_settled(sid, t) for t in txns), return_exceptions=True
            )
            for txn, r in zip(txns, results, strict=True):
                if isinstance(r, OribusError):
                    log.info("decision %s on shard %d kept: %s", txn.txn_id, sid, r)
                elif isinstance(r, BaseException):
                    raise r
                else:
                    n += r
        return n

    async def run_once(self, older_than: float | None = None) -> None:
        await self.resolve_expired(self.txn_expiry_seconds if older_than is None else older_than)
        await self.release_settled()

    async def run_forever(self) -> None:
        """A pass now (orphans of a bus that died), then one every ``interval`` seconds."""
        while True:
            try:
                await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("sweep of abandoned transactions failed")
            await asyncio.sleep(self.interval)
