"""The simulated disk of one shard: its WAL and snapshot, in memory, with crash semantics.

``SimDisk`` is what survives a crash of a simulated shard process. It hands
the shard (through the ``Shard`` seams ``open_wal``, ``load_snapshot_file``,
``write_snapshot_file``, ``read_manifest_file`` and ``write_manifest_file``) a
``SimWal`` with the API of ``oribus.shards.wal.Wal`` that the shard uses — ``append``, ``await sync``,
``last_lsn``, ``durable_lsn``, ``stats``, ``roll``,
``remove_segments_before``, ``await close`` — a snapshot slot and a manifest slot.

Records are encoded with the real frame codec (``encode_record``; replay
decodes them with ``decode_record``), so a record the real WAL would refuse
(an unencodable or oversized body) is refused here too, and replay hands the
shard fresh objects exactly as a restart would.

Where a record can be, and what a crash keeps::

    append()        -> buffer      process memory            lost by any crash
    flush starts    -> in flight   written, fsync running    a crash keeps a prefix of it
                                                             (``keep_in_flight``: 0 = power loss)
    fsync returns   -> durable     on the platter            always kept

Group commit as in the real ``Wal``: at most one flush is in flight; it takes
the whole buffer; its "fsync" takes a seeded random latency on the virtual
clock; every ``sync`` that arrives meanwhile waits for it and starts the next
one if its record came too late. ``durable_lsn`` moves only when an fsync
returns, and ``sync(lsn)`` returns only once it covers ``lsn``.

``unsafe_ack_before_fsync`` (a deliberately broken disk, for testing the
tests): ``sync`` and ``when_durable`` start a flush but report the record durable at
once — an acknowledged record may then be lost by a crash, the bug the durability
check must catch.

Snapshots are written atomically (the real ``write_snapshot`` fsyncs before
it returns), so ``write_snapshot`` replaces the slot at once; a crash never
loses it. ``remove_segments_before(lsn)`` drops durable records below ``lsn``.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from oribus.aio import take_outcome
from oribus.errors import DataCorrupted, Unavailable
from oribus.shards.manifest import ShardManifest
from oribus.shards.wal.record import FrameStatus, decode_record, encode_record
from oribus.shards.wal.writer import GroupCommit
from oribus.sim.history import SimHistory


@dataclass
class DiskConfig:
    fsync_seconds: tuple[float, float] = (0.0002, 0.004)  # uniform latency of one fsync (virtual)
    # Deliberately broken: sync() returns before the fsync (tests must catch lost commits).
    unsafe_ack_before_fsync: bool = False
    # Deliberately broken: the on-disk history store's sync makes nothing durable (tests must
    # catch the versions a crash then takes from it; oribus.sim.history).
    unsafe_history_sync_does_nothing: bool = False
    # Deliberately broken: a replica group's catch-up ships an empty engine copy with the
    # snapshot (the learner lacks the versions the snapshot leaves to the engine; oribus.sim.history).
    unsafe_history_empty_catchup_copy: bool = False


class SimDisk:
    """One shard's persistent storage across simulated crashes and restarts."""

    def __init__(self, name: str, rng: random.Random, config: DiskConfig | None = None) -> None:
        self.name = name
        self.rng = rng
        self.config = config or DiskConfig()
        self.records: list[tuple[int, bytes]] = []  # (lsn, frame), durable, in LSN order
        self.snapshot: tuple[int, bytes] | None = None  # (lsn, raw state)
        self.manifest: ShardManifest | None = None  # the shard's MANIFEST (written atomically)
        self.wal: SimWal | None = None  # the WAL of the running incarnation
        self.lost_records = 0  # appended (or in flight) but dropped by crashes
        # the shard's on-disk history store (history_store="lmdb"), with its crash semantics
        self.history = SimHistory(unsafe_sync_does_nothing=self.config.unsafe_history_sync_does_nothing,
                                  unsafe_empty_catchup_copy=self.config.unsafe_history_empty_catchup_copy)
        self.fsyncs = 0

    # ---- the Shard seams ---------------------------------------------------------

    def open_wal(
        self,
        directory: Any,
        config: Any = None,
        *,
        replay_from_lsn: int = 1,
        on_record: Callable[[int, int, Any], None] | None = None,
        metrics_label: str = "",
        require_lsn: int = 0,
    ) -> SimWal:
        """``Wal.open``: replay every durable record from ``replay_from_lsn`` on, then append."""
        if replay_from_lsn < 1:
            raise ValueError(f"replay_from_lsn must be >= 1, got {replay_from_lsn}")
        last = self.records[-1][0] if self.records else 0
        if max(last, replay_from_lsn - 1) < require_lsn:  # as Wal.open: records were lost
            raise DataCorrupted(f"{self.name}: the log ends at LSN {last}, LSN {require_lsn} was durable",
                                expected_lsn=require_lsn, found_lsn=last)
        if on_record is not None:
            for lsn, frame in self.records:
                if lsn < replay_from_lsn:
                    continue
                d = decode_record(frame)
                assert d.status is FrameStatus.OK, d.reason  # frames here were whole when kept
                on_record(lsn, d.rtype, d.body)
        if self.records and replay_from_lsn > last + 1:
            # the snapshot covers more than the log holds (as Wal.open: drop the covered log)
            self.records = []
        last = max(last, replay_from_lsn - 1)
        self.wal = SimWal(self, last)
        return self.wal

    def load_snapshot(self, directory: Any) -> tuple[int, bytes] | None:
        return self.snapshot

    def write_snapshot(self, directory: Any, lsn: int, raw: bytes) -> None:
        if self.snapshot is None or lsn >= self.snapshot[0]:
            self.snapshot = (lsn, raw)

    def read_manifest(self, directory: Any) -> ShardManifest | None:
        return self.manifest

    def write_manifest(self, directory: Any, manifest: ShardManifest, *, fsync: bool = True) -> None:
        self.manifest = manifest

    # ---- faults --------------------------------------------------------------------

    def crash(self, keep_in_flight: int = 0) -> int:
        """The process died: keep the durable records and ``keep_in_flight`` records of the
        batch whose fsync was running (0: a power cut); everything else is gone.
        Returns how many records were lost."""
        self.history.crash()  # what was not synced (a shard without it has nothing there)
        wal = self.wal
        self.wal = None
        if wal is None:
            return 0
        in_flight = wal._in_flight
        kept = in_flight[: max(0, keep_in_flight)]
        self.records.extend(kept)
        lost = len(in_flight) - len(kept) + len(wal._buffer)
        wal._die(Unavailable(f"{self.name} crashed", shard=self.name))
        self.lost_records += lost
        return lost

    def fsync_latency(self) -> float:
        lo, hi = self.config.fsync_seconds
        return self.rng.uniform(lo, hi)


class SimWal(GroupCommit):
    """The append side of a simulated WAL (API of ``oribus.shards.wal.Wal`` as the shard uses
    it), with the real WAL's group commit (``GroupCommit.sync``)."""

    def __init__(self, disk: SimDisk, last_lsn: int) -> None:
        self._disk = disk
        self._last_lsn = last_lsn
        self._durable_lsn = last_lsn
        self._buffer: list[tuple[int, bytes]] = []  # appended, not yet taken by a flush
        self._in_flight: list[tuple[int, bytes]] = []  # taken by the flush in flight
        self._flush: asyncio.Future[None] | None = None
        self._failed: Unavailable | None = None
        self._closed = False
        self._records = 0
        self._batches = 0
        self.on_new_segment: Callable[[int], None] | None = None  # never called: no segments here

    @property
    def stats(self) -> dict[str, float]:
        return {"fsyncs": self._batches, "records": self._records, "batches": self._batches}

    def append(self, rtype: int, body: Any) -> int:
        self._check_usable()
        lsn = self._last_lsn + 1
        frame = encode_record(rtype, lsn, body)  # raises as the real WAL does
        self._buffer.append((lsn, frame))
        self._last_lsn = lsn
        return lsn

    async def sync(self, lsn: int | None = None) -> None:
        if not self._disk.config.unsafe_ack_before_fsync:
            return await super().sync(lsn)
        target = self._sync_target(lsn)
        if self._durable_lsn < target and (self._flush is None or self._flush.done()):
            self._start_flush()
        # BROKEN on purpose: acknowledges what a crash may still take away

    def when_durable(self, lsn: int, callback: Callable[[BaseException | None], None]) -> None:
        if not self._disk.config.unsafe_ack_before_fsync:
            return super().when_durable(lsn, callback)
        target = self._sync_target(lsn)
        if self._durable_lsn < target and (self._flush is None or self._flush.done()):
            self._start_flush()
        # BROKEN on purpose, as sync: called back before the record is durable
        asyncio.get_running_loop().call_soon(callback, None)
        return None

    def roll(self) -> None:
        """Segments are not simulated: nothing to roll."""

    def remove_segments_before(self, lsn: int) -> int:
        if self._closed:
            raise Unavailable("wal is closed")
        before = len(self._disk.records)
        self._disk.records = [r for r in self._disk.records if r[0] >= lsn]
        return before - len(self._disk.records)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        while self._failed is None and (self._buffer or (self._flush is not None and not self._flush.done())):
            flush = self._flush
            if flush is None or flush.done():
                flush = self._start_flush()
            await asyncio.wait({flush})
        if self._disk.wal is self:
            self._disk.wal = None

    # ---- internals ---------------------------------------------------------------------

    def _check_usable(self) -> None:
        if self._failed is not None:
            raise self._failed
        if self._closed:
            raise Unavailable("wal is closed")

    def _start_flush(self) -> asyncio.Future[None]:
        flush = asyncio.ensure_future(self._write_batch())
        self._flush = flush
        flush.add_done_callback(take_outcome)
        return flush

    async def _write_batch(self) -> None:
        if self._failed is not None:
            raise self._failed
        batch, self._buffer = self._buffer, []
        if not batch:
            return
        self._in_flight = batch
        await asyncio.sleep(self._disk.fsync_latency())
        if self._failed is not None:  # crashed while the fsync ran: crash() decided what stays
            raise self._failed
        self._disk.records.extend(batch)
        self._disk.fsyncs += 1
        self._in_flight = []
        self._durable_lsn = batch[-1][0]
        self._records += len(batch)
        self._batches += 1

    def _die(self, error: Unavailable) -> None:
        self._failed = error
        self._buffer = []
        self._in_flight = []
