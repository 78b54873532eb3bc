"""A shard: the participant core plus its WAL, snapshots and waiting (the asyncio shell).

The core (``participant.py``) decides; this shell moves records to disk and
waits: for the group fsync before acknowledging, for a transaction's outcome
before reading a key under its write intent, for locks before a one-phase
commit (bounded). Durability rules it keeps:

* a one-phase commit or a primary's decision is applied (made visible) only
  after its record is fsynced, and answered only then;
* a PREPARE is fsynced before the participant votes YES;
* a participant's COMMIT/ABORT after the decision need not wait: if it is lost,
  recovery finds the transaction PREPARED and asks the primary again.

A read-only participant's validation (``validate``) writes nothing and waits for
nothing: its read locks are a lease in memory (specs/PROTOCOL.md §5.8). A
writer blocked by a lease waits at most until the lease ends on its own; the
restart grace (no new write intent for a while after the shard starts) is the
participant's, counted from this object's creation.

Snapshots are taken at a low-water LSN (below every record appended but not
yet applied); replay from there is idempotent (see ``store.apply``).

With an on-disk history store (``history_store="lmdb"``, specs/engine.md
"History store") the versions a commit replaces are handed to it when the
commit is applied (its committer thread writes and fdatasyncs them in batches;
the event loop does not wait), and the engine is synced before every
snapshot: a snapshot then holds only current versions, and the WAL after it
replays whatever a crash took from the engine. A replica group's learner receives
the engine's consistent copy with the snapshot (specs/replication.md §7).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

import msgpack

from oribus import tracing
from oribus.contract import Entry, ShardService
from oribus.datadir_lock import DataDirLock
from oribus.delivery_log import DeliveryLog
from oribus.errors import DataCorrupted, InvalidRequest, OribusError, SessionExpired, Unavailable
from oribus.failpoints import failpoint
from oribus.messages import (
    LEASE_EXPIRED,
    Change,
    ReadItem,
    ReadReply,
    ReadRequest,
    ShardTxn,
    Token,
    TxnOutcome,
    TxnRef,
    TxnState,
    TxnStatus,
    Vote,
    VoteKind,
    WatchRequest,
)
from oribus.shards.config import ShardConfig
from oribus.shards.history import HistoryStore
from oribus.shards.manifest import ShardManifest, read_manifest, write_manifest
from oribus.shards.participant import Blocked, Known, Late, Leased, Participant, Pending, Refused
from oribus.shards.retention import AgeCompaction
from oribus.shards.store import VersionedStore
from oribus.shards.txn import RecordType, Txn
from oribus.shards.wal import Wal, WalConfig, load_latest_snapshot, write_snapshot
from oribus.shards.watch import Watcher, changes_of, replay_plan
from oribus.types import DEFAULT_SCAN_LIMIT, DEFAULT_SESSIONS_LISTED, SessionRef

_SCAN_SESSION = SessionRef("oribus", "scan")  # scans record nothing; a read needs some session

log = logging.getLogger("oribus.shard")

# Asks a transaction's primary for its outcome and finishes it here (``Coordinator.recover``).
Resolver = Callable[[int, TxnRef], Awaitable[object]]


class ShardWal(Protocol):
    """The append side of a WAL as a shard uses it: ``Wal``, or the simulator's ``SimWal``."""

    on_new_segment: Callable[[int], None] | None  # called with a full segment's last LSN

    @property
    def last_lsn(self) -> int: ...
    @property
    def durable_lsn(self) -> int: ...
    @property
    def stats(self) -> dict[str, float]: ...
    def append(self, rtype: int, body: Any) -> int: ...
    async def sync(self, lsn: int | None = None) -> None: ...
    def when_durable(self, lsn: int, callback: Callable[[BaseException | None], None]) -> None: ...
    def roll(self) -> None: ...
    def remove_segments_before(self, lsn: int) -> int: ...
    async def close(self) -> None: ...


class WalOpener(Protocol):
    """``Wal.open``: the recovery scan through ``on_record``, then the append side."""

    def __call__(self, directory: Path, config: WalConfig | None = None, *, replay_from_lsn: int = 1,
                 on_record: Callable[[int, int, Any], None] | None = None, metrics_label: str = "",
                 require_lsn: int = 0) -> ShardWal: ...


class ManifestWriter(Protocol):
    """``write_manifest``: atomic, fsynced unless ``fsync=False``."""

    def __call__(self, shard_dir: Path, manifest: ShardManifest, /, *, fsync: bool = True) -> None: ...


def open_history_store(cfg: ShardConfig) -> HistoryStore | None:
    """The on-disk history store ``cfg`` names, opened; None for ``memory`` (the store's own).

    Fails closed on a mismatch: a shard whose directory holds an on-disk history store
    opened with ``history_store="memory"`` would answer history without the versions the
    engine holds (and its snapshots hold none). A replica group's members open theirs here
    too (``oribus.shards.replica.member``)."""
    if cfg.history_store == "memory":
        if (cfg.history_dir / "data.mdb").exists():
            raise InvalidRequest(
                f"shard {cfg.shard_id}: {cfg.history_dir} holds an on-disk history store (lmdb), but "
                "history_store is 'memory': open the shard with history_store='lmdb' "
                "(--history-store lmdb)", shard=cfg.shard_id)
        return None
    from oribus.shards.history.lmdb_engine import LmdbHistory  # lmdb is loaded only when used

    return LmdbHistory(cfg.history_dir, cache_bytes=cfg.history_cache_bytes, unsafe_no_fsync=cfg.wal.unsafe_no_fsync)


def drop_aged_versions(compaction: AgeCompaction, store: VersionedStore, now: float) -> int:
    """One step of the age rule's compaction (``oribus/shards/retention.py``) on ``store`` by the
    wall clock ``now``, its deletes handed to the history store; returns how many versions it
    dropped (unreadable at once). A shard's and a replica follower's compaction alike."""
    dropped = compaction.step(store, now)
    if dropped:
        # Dropped from what reads see, not yet from an engine's file: a crash here brings the
        # versions back at recovery (the next pass drops them again), never loses a kept one.
        failpoint("history.compact")
        store.older.flush()
    return dropped


class Shard(ShardService):
    """One shard in this process. Use ``await Shard.open(config)``."""

    # Seams for the deterministic simulator (``oribus.sim``): it runs this very class on a
    # virtual clock and an in-memory disk by replacing these per instance, before
    # ``__init__`` (``oribus.sim.harness.SimShard``). Real shards keep these defaults:
    # the monotonic clock and the WAL and snapshot files below ``data_dir``.
    clock: Callable[[], float] = staticmethod(time.monotonic)  # deadlines, transaction ages, session TTL, leases
    wall_clock: Callable[[], float] = staticmethod(time.time)  # compared with read leases' deadlines (§5.8)
    open_wal: WalOpener = staticmethod(Wal.open)  # recovery scan + the append side
    # (snapshot_dir) -> (lsn, raw) | None
    load_snapshot_file: Callable[[Path], tuple[int, Any] | None] = staticmethod(load_latest_snapshot)
    write_snapshot_file: Callable[[Path, int, Any], object] = staticmethod(write_snapshot)  # durable on return
    read_manifest_file: Callable[[Path], ShardManifest | None] = staticmethod(read_manifest)  # (data_dir)
    write_manifest_file: ManifestWriter = staticmethod(write_manifest)  # (data_dir, manifest, fsync=); atomic
    # (config) -> the on-disk history store when history_store is not "memory"; None: an
    # LMDB file below data_dir (the simulator hands the one its SimDisk keeps across crashes)
    open_history: Callable[[ShardConfig], HistoryStore] | None = None

    def __init__(self, config: ShardConfig, epoch: int) -> None:
        self.config = config
        self.shard_id = config.shard_id
        self.epoch = epoch
        self.store = VersionedStore(config.history_limit, history_max_age=config.history_max_age_seconds)
        # The age rule's background compaction (None without an age limit): ``compact_history``
        # runs its steps, from ``_compact_forever`` (started by ``open``) or a simulator's task.
        self.compaction = (AgeCompaction(config.history_max_age_seconds, interval=config.history_compaction_interval)
                           if config.history_max_age_seconds is not None else None)
        self._compaction_task: asyncio.Task | None = None
        self.dlog = DeliveryLog(config.delivery_log, clock=self.clock)
        self.core = Participant(
            config.shard_id,
            epoch,
            self.store,
            self.dlog,
            max_resolved=config.max_resolved_txns,
            clock=self.clock,
            wall_clock=self.wall_clock,
            read_lease_seconds=config.read_lease_seconds,
            clock_skew_seconds=config.clock_skew_seconds,
            restart_grace=config.restart_grace,
            unsafe_disable_validation=config.unsafe_disable_validation,
        )
        self.wal: ShardWal | None = None
        self._dir_lock: DataDirLock | None = None  # held (and released on close) when ``open`` took it
        self.resolver: Resolver | None = None
        self._waiters: dict[str, asyncio.Future[None]] = {}
        self._deciding: dict[str, asyncio.Future[TxnOutcome]] = {}
        self._unapplied: set[int] = set()  # LSNs appended whose effects are not yet applied
        # A participant's COMMIT applied before its record is durable (``finish``, §5.5): txn id
        # -> the record's LSN. Until that LSN is acknowledged (``_acknowledged_lsn``: fsynced
        # here, or committed on a majority of a replica group) ``status`` answers PREPARED and
        # a repeated finish waits for it (PROTOCOL.md §10, R-6).
        self._outcome_lsns: dict[str, int] = {}
        self._records_since_snapshot = 0
        self._snapshot_task: asyncio.Task | None = None
        self._closed = False
        self._manifest = ShardManifest(config.shard_id)  # as on disk once recovered
        self._grace_to_lower = False  # the MANIFEST's grace bound is above this life's own
        self._lower_grace: asyncio.TimerHandle | None = None
        self._manifest_lock = threading.Lock()  # raised from the WAL's flush thread and the loop
        self._watchers: set[Watcher] = set()
        self.counters = {"reads": 0, "commits_1pc": 0, "prepares": 0, "decisions": 0,
                         "conflicts": 0, "aborts": 0, "snapshots": 0, "replayed_records": 0,
                         "watches_lagged": 0, "validations": 0, "leases_past_deadline": 0,
                         "refused_in_grace": 0}

    @classmethod
    async def open(cls, config: ShardConfig, *, epoch: int | None = None,
                   dir_lock: DataDirLock | None = None) -> Shard:
        """Lock ``config.data_dir``, recover from the latest snapshot and the WAL after it, then serve.

        ``dir_lock``: the directory's lock, already taken by the caller (who then releases
        it); without it the shard takes the lock itself, before reading anything, and
        releases it on close. A directory another process holds raises ``DataDirLocked``.
        """
        shard = cls(config, epoch if epoch is not None else time.time_ns())
        await shard._start(dir_lock)
        return shard

    async def _start(self, dir_lock: DataDirLock | None) -> None:
        """``open`` after the constructor: lock (without ``dir_lock``), recover, schedule."""
        loop = asyncio.get_running_loop()
        if dir_lock is None:
            self._dir_lock = await loop.run_in_executor(None, DataDirLock.acquire, self.config.data_dir)
        try:
            await loop.run_in_executor(None, self._recover)
        except BaseException:
            with contextlib.suppress(Exception):
                self.store.older.close()
            if self._dir_lock is not None:
                self._dir_lock.release()
            raise
        if self.compaction is not None:
            self._compaction_task = loop.create_task(self.compact_forever())
        if self._grace_to_lower:
            self._lower_grace = loop.call_later(
                self.core.grace_left(), lambda: loop.run_in_executor(None, self._lower_grace_bound))

    def _recover(self) -> None:
        cfg = self.config
        # (no mkdir of data_dir here: open_wal creates data_dir/wal, parents included, and
        # a missing snapshot directory reads as "no snapshot"; the simulator has no files)
        manifest = self.read_manifest_file(cfg.data_dir)
        if manifest is not None and manifest.shard_id != cfg.shard_id:
            raise InvalidRequest(
                f"{cfg.data_dir} holds the data of shard {manifest.shard_id} (its MANIFEST says so), "
                f"not of shard {cfg.shard_id}: refusing to open it as shard {cfg.shard_id}",
                shard=cfg.shard_id,
            )
        # The manifest's high-water mark tells a lost log from a new one (specs/engine.md).
        required = manifest.durable_lsn if manifest is not None else 0
        self._open_history()
        snap = self.load_snapshot_file(cfg.snapshot_dir)
        replay_from = 1
        if snap is not None:
            lsn, raw = snap
            try:
                self.core.load_snapshot(msgpack.unpackb(raw, raw=False, strict_map_key=False))
            except DataCorrupted as e:
                raise DataCorrupted(f"snapshot at LSN {lsn} in {cfg.snapshot_dir}: {e.message}",
                                    path=str(cfg.snapshot_dir), **e.details) from None
            replay_from = lsn + 1

        def on_record(lsn: int, rtype: int, body: dict) -> None:
            self.core.replay(rtype, body)
            self.counters["replayed_records"] += 1

        try:
            wal = self.open_wal(
                cfg.wal_dir, cfg.wal, replay_from_lsn=replay_from, on_record=on_record,
                metrics_label=str(cfg.shard_id),
                require_lsn=0 if cfg.unsafe_allow_empty else required,
            )
        except DataCorrupted as e:
            if "expected_lsn" not in e.details:
                raise
            snapshot = f"snapshot at LSN {replay_from - 1}" if snap is not None else f"no snapshot in {cfg.snapshot_dir}"
            raise DataCorrupted(
                f"shard {cfg.shard_id}: data is missing: {e.message} (per {cfg.data_dir}/MANIFEST; {snapshot}). "
                f"Restore the files, or start the shard from what is left with --allow-empty "
                f"(unsafe_allow_empty), losing those commits",
                shard=cfg.shard_id, **e.details,
            ) from e
        self.store.older.flush()  # the versions replay replaced
        self.wal = wal
        wal.on_new_segment = self._raise_durable_mark
        if manifest is not None and wal.last_lsn < manifest.durable_lsn:
            log.warning(
                "shard %d: data is missing: the log ends at LSN %d but %s/MANIFEST records LSN %d as "
                "durable; starting from what is left because unsafe_allow_empty is set: commits "
                "%d..%d are lost", cfg.shard_id, wal.last_lsn, cfg.data_dir, manifest.durable_lsn,
                wal.last_lsn + 1, manifest.durable_lsn,
            )
        # Recovery fsynced every replayed record, so the mark can move to the log's end
        # (and is rewritten, lowered, after an unsafe_allow_empty open).
        self._manifest = manifest if manifest is not None else ShardManifest(cfg.shard_id)
        mark = self._durable_mark(wal.durable_lsn)
        # The restart grace covers the longest lease any earlier life may still have out, not
        # only this life's configuration (an operator may have lowered read_lease_seconds):
        # the bound is kept in the MANIFEST, fsynced before this life grants any lease.
        own = self.grace_needed()
        earlier = self._manifest.grace_seconds
        if cfg.restart_grace and earlier > own:
            self.core.require_grace(earlier)
            log.info("shard %d: restart grace %.2fs (an earlier life ran with longer read leases than "
                     "this one's %.2fs)", cfg.shard_id, earlier, own)
        bound = max(own, earlier)
        if manifest is None or mark != manifest.durable_lsn or bound != manifest.grace_seconds:
            self._write_manifest(self._manifest.with_durable_lsn(mark).with_grace(bound))
        self._grace_to_lower = bound > own
        self._records_since_snapshot = self.counters["replayed_records"]
        if self.core.prepared:
            log.info("shard %d recovered %d prepared transactions", self.shard_id, len(self.core.prepared))

    def _open_history(self) -> None:
        """Open the configured history store (before the snapshot is loaded into it).

        Fails closed on a mismatch: a shard whose directory holds an on-disk history store
        opened with ``history_store="memory"`` would answer history without the versions
        the engine holds (and its snapshots hold none).
        """
        cfg = self.config
        if cfg.history_store != "memory" and self.open_history is not None:
            self.store.older = self.open_history(cfg)
            return
        history = open_history_store(cfg)
        if history is not None:
            self.store.older = history

    def grace_needed(self) -> float:
        """The restart grace the leases this life grants need: ``H + 2ε`` (0 without a grace)."""
        cfg = self.config
        return cfg.read_lease_seconds + 2 * cfg.clock_skew_seconds if cfg.restart_grace else 0.0

    def _lower_grace_bound(self) -> None:
        """Once this life's restart grace is over, every lease of an earlier life has ended: the
        MANIFEST's bound comes down to this life's own (runs in a worker thread)."""
        if self._closed:
            return
        with self._manifest_lock:
            if self._manifest.grace_seconds > self.grace_needed():
                try:
                    self._write_manifest(self._manifest.with_grace(self.grace_needed()))
                except OSError:  # a bound kept too high only makes the next grace longer
                    log.exception("shard %d: could not lower the grace bound in %s/MANIFEST",
                                  self.shard_id, self.config.data_dir)

    # ---- the manifest's high-water mark -----------------------------------------

    def _durable_mark(self, lsn: int) -> int:
        # Without fsync nothing is known durable: a power loss may legitimately take
        # acknowledged records, and the shard must still open afterwards.
        return 0 if self.config.wal.unsafe_no_fsync else lsn

    def _write_manifest(self, manifest: ShardManifest) -> None:
        """Replace the manifest (callers hold ``_manifest_lock`` once the WAL is open)."""
        self.write_manifest_file(self.config.data_dir, manifest, fsync=not self.config.wal.unsafe_no_fsync)
        self._manifest = manifest

    def _raise_durable_mark(self, lsn: int) -> None:
        """Record in the manifest that every record up to ``lsn`` is durable (never lowers it)."""
        lsn = self._durable_mark(lsn)
        with self._manifest_lock:
            if lsn <= self._manifest.durable_lsn:
                return
            try:
                self._write_manifest(self._manifest.with_durable_lsn(lsn))
            except OSError:
                # A lagging mark is still a true lower bound; the next snapshot or close retries.
                log.exception("shard %d: could not update %s/MANIFEST", self.shard_id, self.config.data_dir)

    # ---- helpers ---------------------------------------------------------------

    def _check_open(self) -> ShardWal:
        if self._closed or self.wal is None:
            raise Unavailable(f"shard {self.shard_id} is closed", shard=self.shard_id)
        return self.wal

    def _append(self, record: tuple[int, dict]) -> int:
        wal = self._check_open()
        lsn = wal.append(*record)
        self._records_since_snapshot += 1
        return lsn

    def _append_or_release(self, txn_id: str, record: tuple[int, dict]) -> int:
        """Append a transaction's first record; if it cannot even be encoded or buffered,
        the transaction never happened: release its locks instead of holding them forever."""
        try:
            return self._append(record)
        except BaseException as e:
            self.core.cancel_unlogged(txn_id)
            self._resolved(txn_id)
            if isinstance(e, OribusError):
                raise
            raise InvalidRequest(f"transaction {txn_id!r} cannot be logged: {e}") from e

    async def _durable(self, lsn: int) -> None:
        # a failed write surfaces as the WAL's own Unavailable, for this and every later sync
        await self._check_open().sync(lsn)

    def _apply_commit(self, txn_id: str) -> TxnOutcome:
        """Make a transaction's writes visible, then offer them to the watchers.

        Every place that commits goes through here (one-phase, the primary's
        decision, a participant's finish); aborts make nothing visible, so
        watchers never see an aborted or refused write.
        """
        txn = self.core.known(txn_id)
        # (the changes are taken before applying: a resolved transaction keeps no values)
        changes = changes_of(txn) if txn is not None and txn.state is TxnState.PREPARED and self._watchers else None
        outcome = self.core.apply_commit(txn_id)
        self.store.older.flush()  # the versions it replaced, to an on-disk history store's committer (no wait)
        if changes and outcome.state is TxnState.COMMITTED:
            self._publish(changes)
        return outcome

    def _publish(self, changes: list[Change]) -> None:
        for watcher in list(self._watchers):  # a watcher that lags detaches itself
            prefix = watcher.prefix
            for change in changes:
                if change.key.startswith(prefix):
                    watcher.offer(change)

    def _detach_watcher(self, watcher: Watcher) -> None:
        self._watchers.discard(watcher)
        if watcher.lagged:
            self.counters["watches_lagged"] += 1

    def _resolved(self, txn_id: str) -> None:
        fut = self._waiters.pop(txn_id, None)
        if fut is not None and not fut.done():
            fut.set_result(None)

    async def _wait_for(self, txn_ids: set[str], timeout: float) -> None:
        loop = asyncio.get_running_loop()
        futs = []
        for t in txn_ids:
            left = self.core.lease_left(t)
            if left is not None:
                # a read-only participant's lease: released by its coordinator, or over by itself
                timeout = min(timeout, left)
            elif (known := self.core.known(t)) is None or known.resolved:
                continue
            fut = self._waiters.get(t)
            if fut is None:
                fut = self._waiters[t] = loop.create_future()
            futs.append(fut)
        if futs:
            await asyncio.wait(futs, timeout=timeout)
        # Closed meanwhile (a stop, or a replica group's primary deposed): ``close`` woke every
        # waiter, but the locks they waited for are still held in memory and will never be
        # released here. Every caller loops back to what blocked it; without this check it
        # would find the same locks and wait again at once, a busy loop until its deadline
        # (and forever on the simulation's virtual clock, which only moves when the loop is idle).
        self._check_open()
        for t in self.core.expire_leases():  # leases over by themselves: wake who waits for them
            self._resolved(t)

    def _maybe_snapshot(self) -> None:
        if (
            self._records_since_snapshot >= self.config.snapshot_every_records
            and self._snapshot_task is None
            and not self._closed
        ):
            self._snapshot_task = asyncio.get_running_loop().create_task(self._snapshot_bg())

    async def _snapshot_bg(self) -> None:
        try:
            await self.snapshot()
        except Unavailable as e:  # closed, failed, or (replicated) deposed: nothing to report but that
            log.warning("shard %d: snapshot not written: %s", self.shard_id, e)
        except Exception:  # a failed snapshot loses nothing: the WAL still holds everything
            log.exception("shard %d: snapshot failed", self.shard_id)
        finally:
            self._snapshot_task = None

    async def snapshot(self) -> int:
        """Write a snapshot now and drop the WAL segments it covers. Returns its LSN."""
        wal = self._check_open()
        low = (min(self._unapplied) - 1) if self._unapplied else wal.last_lsn
        self.store.older.flush()
        raw = msgpack.packb(self.snapshot_state(), use_bin_type=True)
        reflected = wal.last_lsn  # the state holds effects of records up to here, no further
        wal.roll()
        self._records_since_snapshot = 0
        loop = asyncio.get_running_loop()
        if self.replicated:
            # A replica group's primary holds state of records not yet committed (a PREPARE's
            # locks); a snapshot, which members may install and which outlives a failover,
            # holds only committed state: wait until all it reflects is (specs/replication.md §7).
            await wal.sync(reflected)
        # An on-disk history store holds the versions this snapshot leaves out: durable
        # first, before the snapshot lets the WAL below ``low`` go.
        await loop.run_in_executor(None, self.store.older.sync)
        failpoint("history.after_sync")
        await loop.run_in_executor(None, self.write_snapshot_file, self.config.snapshot_dir, low, raw)
        await loop.run_in_executor(None, wal.remove_segments_before, low + 1)
        await loop.run_in_executor(None, self._raise_durable_mark, max(low, wal.durable_lsn))
        self.counters["snapshots"] += 1
        return low

    replicated = False  # a replica group's primary (``oribus.shards.replica.member``)

    def snapshot_state(self) -> dict:
        """What a snapshot holds: the participant's state (a replica group adds its terms)."""
        return self.core.to_snapshot()

    # ---- reads -----------------------------------------------------------------

    @tracing.traced_shard_call("read")
    async def read(self, req: ReadRequest) -> ReadReply:
        self._check_open()
        deadline = self.clock() + self.config.read_wait_seconds
        resolved_via_primary = False
        while True:
            result = self.core.read(req)
            if not isinstance(result, Blocked):
                self.counters["reads"] += len(req.keys)
                return result
            left = deadline - self.clock()
            if left <= 0:
                if not resolved_via_primary and self.resolver is not None:
                    resolved_via_primary = True
                    await self._resolve_via_primary(result.txn_ids)
                    deadline = self.clock() + self.config.read_wait_seconds
                    continue
                raise Unavailable(
                    f"keys are locked by transaction(s) {sorted(result.txn_ids)} whose outcome is not "
                    f"known yet (shard {self.shard_id})",
                    shard=self.shard_id,
                )
            await self._wait_for(result.txn_ids, left)

    async def _resolve_via_primary(self, txn_ids: set[str]) -> None:
        for t in txn_ids:
            txn = self.core.prepared.get(t)
            if txn is not None and not txn.one_phase and self.resolver is not None:
                with contextlib.suppress(OribusError):
                    await self.resolver(self.shard_id, TxnRef(txn.txn_id, txn.primary, txn.participants))

    # ---- commits -----------------------------------------------------------------

    @tracing.traced_shard_call("commit_one_phase")
    async def commit_one_phase(self, txn: ShardTxn) -> TxnOutcome:
        self._check_open()
        deadline = self.clock() + self.config.lock_wait_seconds
        while True:
            try:
                result = self._begin_one_phase(txn)
            except (SessionExpired, InvalidRequest):
                if txn.deadline is not None:
                    # Read-only participants hold leases for it and will be released: a copy
                    # of an earlier attempt still on its way must not commit after that.
                    self.core.apply_abort(txn.txn_id)
                raise
            if isinstance(result, Late):
                # The read leases it relies on may have ended (PROTOCOL.md §5.8): refused for
                # good, with a tombstone as for a Conflict below.
                self.counters["leases_past_deadline"] += 1
                self.core.apply_abort(txn.txn_id)
                log.info("shard %d refused %s: its read leases' deadline %.3f passed (wall clock %.3f, "
                         "skew bound %gs)", self.shard_id, txn.txn_id, result.deadline, result.now,
                         self.config.clock_skew_seconds)
                return TxnOutcome(TxnState.ABORTED, reason=LEASE_EXPIRED)
            if isinstance(result, Refused):
                left = deadline - self.clock()
                if result.only_locked and left > 0 and self.core.may_wait(txn, result.blockers):
                    await self._wait_for(result.blockers, left)
                    continue
                self.counters["conflicts"] += 1
                # Remember the refusal as an ABORTED tombstone, as a two-phase abort leaves:
                # a delayed or duplicated copy of this commit id that arrives after the client
                # was told Conflict (and, say, re-read or forgot the stale key) must get the
                # same answer, not commit (found by the deterministic simulation). In memory
                # only: after a restart, a copy from a session that read here is refused by
                # the epoch in its token instead.
                self.core.apply_abort(txn.txn_id)
                return TxnOutcome(TxnState.ABORTED, stale=result.stale)
            if isinstance(result, Known):
                return await self._known_outcome(result.txn)
            break
        assert isinstance(result, Pending)
        lsn = self._append_or_release(txn.txn_id, result.record)
        self._unapplied.add(lsn)
        # The record is in the WAL buffer now: the next flush makes it durable whether or
        # not this caller still waits. So the commit is carried out by the flush's completion,
        # even if the caller is cancelled (a client that disconnects mid-commit); dropping it
        # here would let a restart replay it over later commits of the same versions, losing
        # those. A cancelled caller cancels only its own wait.
        done: asyncio.Future[TxnOutcome] = asyncio.get_running_loop().create_future()
        try:
            self._check_open().when_durable(lsn, lambda error: self._complete_one_phase(txn.txn_id, lsn, error, done))
        except Exception as e:  # noqa: BLE001 - the WAL failed or closed meanwhile: answered through done
            self._complete_one_phase(txn.txn_id, lsn, e, done)
        return await done

    def _complete_one_phase(self, txn_id: str, lsn: int, error: BaseException | None,
                            done: asyncio.Future[TxnOutcome]) -> None:
        """The one-phase commit's record is durable (``error`` None): apply it and answer ``done``;
        or the WAL failed: it never acknowledges again, so never apply."""
        if error is not None:
            self._unapplied.discard(lsn)
            self.core.cancel_unlogged(txn_id)
            self._resolved(txn_id)
            if not done.done():
                done.set_exception(error)
            return
        try:
            outcome = self._apply_commit(txn_id)
        except Exception as e:  # noqa: BLE001 - a bug in applying: the caller gets it, the flush goes on
            log.exception("shard %d: applying the one-phase commit of %s failed", self.shard_id, txn_id)
            if not done.done():
                done.set_exception(e)
            return
        finally:
            self._unapplied.discard(lsn)
            self._resolved(txn_id)
        self.counters["commits_1pc"] += 1
        self._maybe_snapshot()
        if not done.done():
            done.set_result(outcome)

    def _begin_one_phase(self, txn: ShardTxn) -> Known | Refused | Pending | Late:
        try:
            return self.core.begin_one_phase(txn)
        except Unavailable:
            self.counters["refused_in_grace"] += 1
            raise

    async def _known_outcome(self, txn: Txn) -> TxnOutcome:
        """A retried commit id: wait if it is still in flight, then report its outcome."""
        deadline = self.clock() + self.config.read_wait_seconds
        while txn.state is TxnState.PREPARED and self.clock() < deadline:
            await self._wait_for({txn.txn_id}, deadline - self.clock())
        if txn.state is TxnState.PREPARED:
            raise Unavailable(f"transaction {txn.txn_id} is still in progress", shard=self.shard_id)
        return self.core.outcome(txn.txn_id)

    @tracing.traced_shard_call("prepare")
    async def prepare(self, txn: ShardTxn) -> Vote:
        self._check_open()
        try:
            result = self.core.prepare(txn)
        except Unavailable:
            self.counters["refused_in_grace"] += 1
            raise
        if isinstance(result, Pending):
            lsn = self._append_or_release(txn.txn_id, result.record)
            await self._durable(lsn)
            failpoint("txn.after_prepare")
            self.counters["prepares"] += 1
        elif isinstance(result, Refused):
            self.counters["conflicts"] += 1
        return self.core.vote_for(result)

    @tracing.traced_shard_call("validate")
    async def validate(self, txn: ShardTxn) -> Vote:
        """A read-only participant (PROTOCOL.md §5.8): validate, lease the read locks, vote."""
        self._check_open()
        result = self.core.validate_reads(txn)
        self.counters["validations"] += 1
        if isinstance(result, Leased):
            return Vote(VoteKind.YES, lease=result.seconds)
        if isinstance(result, Refused):
            self.counters["conflicts"] += 1
        return self.core.vote_for(result)

    @tracing.traced_shard_call("release_lease")
    async def release_lease(self, txn_id: str) -> None:
        self._check_open()
        if self.core.release_lease(txn_id):
            self._resolved(txn_id)  # wake the writers waiting for it

    @tracing.traced_shard_call("release_leases")
    async def release_leases(self, txn_ids: list[str]) -> None:
        self._check_open()
        for txn_id in txn_ids:
            if self.core.release_lease(txn_id):
                self._resolved(txn_id)

    @tracing.traced_shard_call("withdraw")
    async def withdraw(self, txn: ShardTxn) -> TxnOutcome:
        """The coordinator will not commit ``txn`` here (a read-only participant refused).

        A known id answers its outcome — waiting for a one-phase commit still in flight —
        so a retry whose earlier attempt committed is told so; an unknown one gets an
        ABORTED tombstone, so a copy of an earlier attempt still on its way can no longer
        commit (in memory, as a refused one-phase commit's: after a restart such a copy is
        past its deadline or inside the restart grace, PROTOCOL.md §5.8), and the answer
        names what this shard's own checks refuse (``Participant.withdraw``).
        """
        self._check_open()
        result = self.core.withdraw(txn)
        if isinstance(result, Known):
            return await self._known_outcome(result.txn)
        return TxnOutcome(TxnState.ABORTED, stale=result.stale)

    @tracing.traced_shard_call("decide")
    async def decide(self, txn_id: str, commit: bool, deadline: float | None = None) -> TxnOutcome:
        self._check_open()
        running = self._deciding.get(txn_id)
        if running is not None:
            await asyncio.shield(running)
            return self.core.outcome(txn_id)
        state, record, reason = self.core.begin_decide(txn_id, commit, deadline)
        if record is None:
            return self.core.outcome(txn_id)
        if reason:
            self.counters["leases_past_deadline"] += 1
        fut: asyncio.Future[TxnOutcome] = asyncio.get_running_loop().create_future()
        self._deciding[txn_id] = fut
        try:
            if state is TxnState.ABORTED and self.core.known(txn_id) is None:
                self.core.apply_abort(txn_id)  # tombstone first: a late prepare must vote NO
            lsn = self._append(record)
            self._unapplied.add(lsn)
        except BaseException as e:
            self._deciding.pop(txn_id, None)
            fut.set_exception(e)
            fut.exception()  # mark retrieved
            raise
        # The decision is in the WAL buffer: the next flush makes it durable whether or not
        # this caller still waits, so it is carried out even if the caller is cancelled (a
        # bus whose connection drops). Left half done, the WAL would say COMMITTED while a
        # later abort of the still-PREPARED transaction released the other participants.
        outcome = await asyncio.shield(self._carry_out_decision(txn_id, state, lsn, fut))
        if reason and outcome.state is TxnState.ABORTED:
            outcome.reason = reason
        return outcome

    async def _carry_out_decision(
        self, txn_id: str, state: TxnState, lsn: int, fut: asyncio.Future[TxnOutcome]
    ) -> TxnOutcome:
        try:
            try:
                await self._durable(lsn)
            finally:
                self._unapplied.discard(lsn)
            failpoint("txn.after_decide")
            if state is TxnState.COMMITTED:
                outcome = self._apply_commit(txn_id)
            else:
                outcome = self.core.apply_abort(txn_id)
                self.counters["aborts"] += 1
            self.counters["decisions"] += 1
            fut.set_result(outcome)
            self._resolved(txn_id)
            self._maybe_snapshot()
            return outcome
        except BaseException as e:
            if not fut.done():
                fut.set_exception(e)
                fut.exception()  # mark retrieved
            raise
        finally:
            self._deciding.pop(txn_id, None)

    @tracing.traced_shard_call("finish")
    async def finish(self, txn_id: str, commit: bool) -> TxnOutcome:
        self._check_open()
        txn = self.core.known(txn_id)
        if commit:
            if txn is None:
                log.warning("shard %d: commit of unknown transaction %s ignored", self.shard_id, txn_id)
                return TxnOutcome(TxnState.ABORTED)
            lsn = None
            if txn.state is TxnState.PREPARED:
                failpoint("txn.before_participant_commit")
                lsn = self._append((int(RecordType.COMMIT), {"i": txn_id}))
                self._outcome_lsns[txn_id] = lsn
            else:
                lsn = self._unacknowledged_outcome(txn_id)  # a repeated finish: the record may be on its way
            outcome = self._apply_commit(txn_id)
            if lsn is not None:
                # Answer only once the COMMIT record is durable: the coordinator then lets the
                # primary forget the decision, and a participant that restarts still prepared
                # after that would find no outcome at the primary and abort — half a commit.
                # A repeated finish (a retried commit id) waits for the same record.
                self._resolved(txn_id)
                await self._durable(lsn)
                self._unacknowledged_outcome(txn_id)
                self._maybe_snapshot()
                return outcome
        else:
            if txn is None or txn.state is TxnState.PREPARED:
                self._append((int(RecordType.ABORT), {"i": txn_id}))
            outcome = self.core.apply_abort(txn_id)
        self._resolved(txn_id)
        self._maybe_snapshot()
        return outcome

    async def status(self, txn_id: str) -> TxnStatus:
        """What this shard knows of ``txn_id``. A COMMITTED outcome is answered only once the
        record that made it so is acknowledged (``_acknowledged_lsn``); until then PREPARED, as
        the transaction still is on the log a failover or a restart would recover from. The
        recovery sweep releases a kept decision only when no participant answers PREPARED
        (PROTOCOL.md §10, R-6): trusting an outcome held only in memory, it would let the
        primary forget a decision a participant may yet have to ask for."""
        status = self.core.status(txn_id)
        if status.state is TxnState.COMMITTED and self._unacknowledged_outcome(txn_id) is not None:
            status.state = TxnState.PREPARED
        return status

    def _acknowledged_lsn(self) -> int:
        """Records up to here may be relied on: fsynced here (a replica group: on a majority)."""
        return self.wal.durable_lsn if self.wal is not None else 0

    def _unacknowledged_outcome(self, txn_id: str) -> int | None:
        """The LSN of ``txn_id``'s COMMIT if it is applied but not yet acknowledged (else None)."""
        lsn = self._outcome_lsns.get(txn_id)
        if lsn is None:
            return None
        if lsn <= self._acknowledged_lsn():
            del self._outcome_lsns[txn_id]
            return None
        return lsn

    async def release(self, txn_id: str) -> None:
        if self.core.release(txn_id):
            # Logged so a restart does not bring the decision back; not waited for: a lost
            # RELEASE only means the recovery sweep releases it again.
            self._append((int(RecordType.RELEASE), {"i": txn_id}))

    async def expired(self, older_than: float) -> list[TxnRef]:
        return [TxnRef(t.txn_id, t.primary, t.participants) for t in self.core.expired(older_than)]

    async def unreleased(self) -> list[TxnRef]:
        return [TxnRef(t.txn_id, t.primary, t.participants) for t in self.core.decisions.values()]

    # ---- watch -----------------------------------------------------------------------

    def watch(self, request: WatchRequest) -> AsyncIterator[Change]:
        """Replay the kept versions asked for, then stream changes as they become visible.

        Registration and the replay plan happen now, in one step (see
        ``oribus.shards.watch``): every change made visible after this call
        returns is streamed.
        """
        self._check_open()
        watcher = Watcher(
            request.prefix, shard_id=self.shard_id, limit=self.config.watch_queue_limit,
            detach=self._detach_watcher,
        )
        self._watchers.add(watcher)  # subscribe first: from here on every visible change is queued
        try:
            watcher.set_replay(replay_plan(self.store, request))
        except BaseException:
            self._watchers.discard(watcher)
            raise
        return watcher

    # ---- other operations ----------------------------------------------------------

    async def scan(self, prefix: str = "", after: str = "", limit: int = DEFAULT_SCAN_LIMIT) -> list[ReadItem]:
        self._check_open()
        keys = self.store.live_keys_page(prefix, after, limit)
        if not keys:
            return []
        # Through the read path, so a key under a write intent waits for its outcome.
        reply = await self.read(ReadRequest(_SCAN_SESSION, keys, record=False, detail=True))
        return [i for i in reply.items if i.value is not None]

    async def sessions(
        self, limit: int = DEFAULT_SESSIONS_LISTED
    ) -> list[tuple[SessionRef, dict[str, int], float]]:
        return self.dlog.recent_sessions(limit)

    async def history(self, key: str, limit: int | None = None) -> list[Entry]:
        self._check_open()
        return self.store.history(key, limit)

    async def forget(self, session: SessionRef, keys: list[str]) -> None:
        self.dlog.forget(session, keys)

    async def reset(self, session: SessionRef) -> Token | None:
        self.dlog.reset(session)
        inc = self.dlog.incarnation_of(session)
        return None if inc is None else (self.epoch, inc)

    async def drop(self, session: SessionRef) -> None:
        self.dlog.drop(session)

    async def reset_every_session(self) -> int:
        return self.dlog.reset_all()

    async def stats(self) -> dict:
        wal = self.wal
        return {
            "shard": self.shard_id,
            "epoch": self.epoch,
            "keys": len(self.store),
            "history": {"store": self.config.history_store, "limit": self.config.history_limit,
                        "max_age_seconds": self.config.history_max_age_seconds,
                        "compaction_passes": self.compaction.passes if self.compaction is not None else 0,
                        **self.store.older.stats()},
            "prepared": len(self.core.prepared),
            "leases": len(self.core.leases),
            "restart_grace_left": round(self.core.grace_left(), 3),
            "delivery_log": self.dlog.stats(),
            "wal": dict(wal.stats) if wal is not None else {},
            "watchers": len(self._watchers),
            **self.counters,
        }

    def expire_sessions(self) -> int:
        return self.dlog.expire_idle()

    # ---- retention ---------------------------------------------------------------

    def compact_history(self) -> int:
        """One step of the age rule's compaction (``oribus/shards/retention.py``): drop the
        versions of the next batch of keys committed more than ``history_max_age_seconds`` ago
        by this shard's wall clock, and hand the deletes to the history store. Returns how many
        versions it dropped (they are unreadable at once)."""
        if self.compaction is None or self._closed:
            return 0
        return drop_aged_versions(self.compaction, self.store, self.wall_clock())

    async def compact_forever(self) -> None:
        """Run ``compact_history`` every ``history_compaction_interval`` seconds until the shard closes."""
        while not self._closed:
            await asyncio.sleep(self.config.history_compaction_interval)
            try:
                self.compact_history()
            except Exception:  # a failed step drops nothing more; the next one tries again
                log.exception("shard %d: history compaction step failed", self.shard_id)

    def expire_leases(self) -> int:
        """End the read leases whose time is over (a writer's check does it too, lazily)."""
        ended = self.core.expire_leases()
        for t in ended:
            self._resolved(t)
        return len(ended)

    async def close(self) -> None:
        """Flush the WAL and stop. Idempotent."""
        if self._closed:
            return
        if self._snapshot_task is not None:
            with contextlib.suppress(Exception):
                await self._snapshot_task
        self._closed = True
        if self._lower_grace is not None:
            self._lower_grace.cancel()
        if self._compaction_task is not None:
            self._compaction_task.cancel()
        for watcher in list(self._watchers):
            watcher.end()
        waiters, self._waiters = self._waiters, {}
        for fut in waiters.values():
            if not fut.done():
                fut.set_result(None)
        try:
            if self.wal is not None:
                await self.wal.close()
                await asyncio.get_running_loop().run_in_executor(None, self._raise_durable_mark,
                                                                 self.wal.durable_lsn)
        finally:
            try:  # flush and fsync an on-disk history store, and close it
                await asyncio.get_running_loop().run_in_executor(None, self.store.older.close)
            finally:
                if self._dir_lock is not None:
                    self._dir_lock.release()
