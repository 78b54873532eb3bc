"""One member of a replica group: ``ReplicaMember`` (``specs/replication.md`` §2, §3, §5, §7).

A member is a data directory (the layout of a shard's: ``MANIFEST``, ``wal/``,
``snapshots/``; every file operation in ``files.py``) and one of two roles:

* **follower** (the default): it keeps the log its primary ships (``append``), promises terms
  to candidates (``promise``), takes a snapshot when it lags behind the primary's log
  (``install_snapshot``), and applies records to a store of its own only up to the commit
  index the primary tells it — that applied state is what its own snapshots hold, so its log
  stays bounded. It never serves clients.
* **primary** (``become_primary``): it appends its term's ``TERM_START``, waits until it is
  committed on a majority, then opens a ``Shard`` on its directory exactly as a restarted
  shard recovers (snapshot + log replay, PREPARED transactions resolved through their
  primaries, restart grace, empty delivery log) with epoch = term, on a ``ReplicatedWal``
  (``primary.py``): every durability point waits for the majority.

Durable state, in the member's ``MANIFEST`` (``oribus.shards.manifest``), fsynced before it is
acted on: the member id, the voter flag, the promised term.

Rules, as the design states them:

* ``append``: rule 1 — a batch of a term below the promised one is refused, naming the
  promised term; a higher term is promised (durably) before anything else. Rule 2 — the
  member's record at ``prev`` must have ``prev``'s term (records a snapshot covers are
  committed and agree by construction), otherwise it refuses, naming its last position.
  An accepted batch leaves the log equal to the primary's up to the batch's end: records
  that already agree are kept, the first that differs and all after it (a divergent tail,
  never committed) are cut, the rest appended byte for byte; fsynced before the reply,
  whose ``durable_lsn`` is the batch's end. Records are applied up to
  ``min(commit_lsn, batch end)``.
* ``promise``: granted to a term at or above the promised one (recorded durably first); a
  learner answers ``voter=False`` and promises nothing. Appends and promises are handled
  one at a time, so a promise's last position includes every record already acknowledged.
* learners: a member whose data is missing or damaged opens as a learner with an empty log
  (damaged files are moved aside to ``damaged-<ns>/``). An empty directory is a new member
  (a voter) only while the group has never had a term (``term_register`` 0): no record can
  have been committed then. A learner becomes a voter once an accepted batch shows it holds
  the primary's log up to the primary's commit index, and that commit index covers the
  primary's ``TERM_START`` (``rules.becomes_voter``), and records the flag (fsynced) before
  it answers anything as a voter.
* a higher term seen while primary (in an append or a promise) deposes it: it stops
  acknowledging at once and steps down to follower (its ``Shard`` is closed), and
  ``on_deposed(term)`` is called.

Failpoints (``oribus.failpoints``): ``replica.before_truncate`` (the MANIFEST's mark lowered,
the divergent tail not yet cut), ``replica.after_truncate``, ``replica.install_snapshot``
(a snapshot's member has deleted its log and not yet written the snapshot),
``replica.before_voter`` (a learner about to record that it is a voter).

A call whose caller is cancelled (a dropped connection) still runs to its end
(``carried_out``): the member's lock is released only once the log and its tables agree.

The member's logic has no sleeps or sockets: calls arrive through its methods (a stream
server in a real group, ``DirectPeer`` in tests), and the primary's shipping is
``ReplicatedWal``'s tasks.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import threading
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import msgpack

from oribus.aio import take_outcome
from oribus.datadir_lock import DataDirLock
from oribus.delivery_log import DeliveryLog
from oribus.errors import DataCorrupted, InvalidRequest, Unavailable
from oribus.failpoints import failpoint
from oribus.metrics import REPLICA_TAKEOVERS
from oribus.shards.config import ShardConfig
from oribus.shards.history import HistoryStore
from oribus.shards.manifest import ShardManifest
from oribus.shards.participant import Participant
from oribus.shards.replica.catchup import CatchupData, CatchupReceiver, CatchupSource
from oribus.shards.replica.files import MemberFiles
from oribus.shards.replica.messages import (
    AppendBatch,
    AppendReply,
    Peer,
    Position,
    PromiseReply,
    SnapshotChunk,
)
from oribus.shards.replica.primary import ReplicatedWal, ReplicationOptions
from oribus.shards.replica.rules import becomes_voter, may_promise, plan_append
from oribus.shards.replica.terms import Terms
from oribus.shards.retention import AgeCompaction
from oribus.shards.shard import Shard, drop_aged_versions, open_history_store
from oribus.shards.store import VersionedStore
from oribus.shards.wal import Wal
from oribus.shards.wal.record import TERM_START
from oribus.shards.wal.snapshot import decode_snapshot_file

log = logging.getLogger("oribus.replica")

T = TypeVar("T")

FOLLOWER = "follower"
STARTING = "starting"  # become_primary: TERM_START appended, not yet committed
PRIMARY = "primary"
CLOSED = "closed"


async def carried_out(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to its end even if the caller is cancelled (a connection that drops while
    its append is being fsynced): a cancelled caller cancels only its own wait. Half an
    append, truncation or snapshot install would leave the log and the member's tables apart;
    the member's lock is held until the work is done, so the next call sees all of it."""
    task = asyncio.ensure_future(coro)
    task.add_done_callback(take_outcome)
    return await asyncio.shield(task)


def _engine_copy(history: object) -> BinaryIO | None:
    """A consistent copy of an on-disk history store (``LmdbHistory.copy_file``); None when
    ``history`` is none or cannot give one (in memory, or not open)."""
    copy = getattr(history, "copy_file", None)
    return copy() if copy is not None else None


class ReplicaShard(Shard):
    """The ``Shard`` a member serves as primary: its WAL is the member's ``ReplicatedWal``,
    its MANIFEST the member's (the member's fields kept), its snapshots carry the terms."""

    replicated = True

    def __init__(self, config: ShardConfig, epoch: int, member: ReplicaMember, rwal: ReplicatedWal) -> None:
        self.member = member
        self.rwal = rwal
        self.open_wal = self._replay_member_wal
        self.load_snapshot_file = lambda _d: member.files.load_snapshot()
        self.write_snapshot_file = lambda _d, lsn, raw: member.files.write_snapshot(lsn, raw)
        self.read_manifest_file = lambda _d: member.manifest
        self.write_manifest_file = member._write_shard_manifest
        super().__init__(config, epoch)

    def _replay_member_wal(self, directory: Path, config: Any = None, *, replay_from_lsn: int = 1,
                           on_record: Callable[[int, int, Any], None] | None = None,
                           metrics_label: str = "", require_lsn: int = 0) -> ReplicatedWal:
        """Recovery over the member's open log (every record in it is committed now)."""
        self.rwal.wal.replay(replay_from_lsn, on_record)
        return self.rwal

    def snapshot_state(self) -> dict:
        state = self.core.to_snapshot()
        state["terms"] = self.member.terms.to_list()
        return state

    def _acknowledged_lsn(self) -> int:
        """The group's commit index: a record fsynced only here may still be lost by a failover."""
        return self.rwal.commit_lsn


class ReplicaMember:
    """One member of a replica group (module docstring). ``await ReplicaMember.open(...)``."""

    # Every file operation goes through this (``files.py``); the simulation substitutes its own.
    files_class: type[MemberFiles] = MemberFiles
    # The Shard served as primary: the simulation (``oribus.sim.group``) substitutes one on
    # its virtual clocks, as it sets ``Shard.clock``.
    shard_class: type[ReplicaShard] = ReplicaShard

    def __init__(self, config: ShardConfig, member_id: int, replicas: int,
                 options: ReplicationOptions | None) -> None:
        self.config = config
        self.files = self.files_class(config)
        self.shard_id = config.shard_id
        self.member_id = member_id
        self.replicas = replicas
        self.options = options or ReplicationOptions()
        self.on_deposed: Callable[[int], None] | None = None  # called with the deposing term
        self.shard: ReplicaShard | None = None  # while primary
        self.rwal: ReplicatedWal | None = None  # while starting or primary
        self.wal: Wal | None = None
        self.terms = Terms()
        self.core: Participant | None = None  # the follower's applied state
        # The follower's on-disk history store (history_store="lmdb"; None in memory), closed
        # while the member is primary: its Shard opens the same directory.
        self._history: HistoryStore | None = None
        # Held while that engine is copied for a learner or closed (two worker threads: a copy
        # for a primary whose term is starting, and become_primary closing it for its Shard).
        self._history_lock = threading.Lock()
        self.role = FOLLOWER
        self._manifest = ShardManifest(config.shard_id, member=member_id)
        self._manifest_lock = threading.Lock()
        self._lock = asyncio.Lock()  # appends, promises, snapshots and role changes: one at a time
        self._dir_lock: DataDirLock | None = None
        self._own_lock = False
        self._pending: collections.deque[tuple[int, int, Any]] = collections.deque()  # not yet applied
        self._applied_lsn = 0
        self._snapshot_lsn = 0
        self._commit_known = 0  # the highest commit index a primary told us (capped by agreement)
        self._snapshot_task: asyncio.Task | None = None
        # The age rule on the follower's own store (as primary, its Shard runs its own), paced
        # like a shard's (``oribus/shards/retention.py``); None without an age limit.
        max_age = config.history_max_age_seconds
        self._compaction = (AgeCompaction(max_age, interval=config.history_compaction_interval)
                            if max_age is not None else None)
        self._compaction_task: asyncio.Task | None = None
        self._incoming: CatchupReceiver | None = None  # a snapshot (and history file) being received
        self._incoming_lsn = -1
        self.counters = {"appends": 0, "refused_term": 0, "refused_mismatch": 0, "truncated_records": 0,
                         "promises": 0, "snapshots_installed": 0, "snapshots": 0, "learner_starts": 0,
                         "history_dropped_by_age": 0}

    # ---- opening ------------------------------------------------------------------

    @classmethod
    async def open(cls, data_dir: str | os.PathLike, shard_id: int, member_id: int, replicas: int, *,
                   config: ShardConfig | None = None, term_register: int = 0,
                   options: ReplicationOptions | None = None, dir_lock: DataDirLock | None = None,
                   ) -> ReplicaMember:
        """Open member ``member_id`` of shard ``shard_id``'s group of ``replicas`` in ``data_dir``.

        ``config``: the shard's configuration when this member is primary (its ``data_dir``
        must be ``data_dir``; default ``ShardConfig(shard_id, data_dir)``). ``term_register``:
        the group's term register as read from etcd at start; it becomes the promised term if
        higher (§7), and 0 says no term ever existed (an empty directory is then a new voter;
        otherwise a learner). ``dir_lock``: the directory's lock if the caller took it
        (released by the caller); otherwise the member takes it and releases it on ``close``.
        Missing or damaged data opens as a learner with an empty log (module docstring).
        """
        if replicas < 2:
            raise InvalidRequest(f"a replica group has 3 or 5 members, not {replicas}: an unreplicated "
                                 "shard is a Shard")
        if not 0 <= member_id < replicas:
            raise InvalidRequest(f"member id {member_id} is outside the group's 0..{replicas - 1}")
        data_dir = Path(data_dir)
        cfg = config or ShardConfig(shard_id=shard_id, data_dir=data_dir)
        if Path(cfg.data_dir) != data_dir or cfg.shard_id != shard_id:
            raise InvalidRequest(f"config is for shard {cfg.shard_id} in {cfg.data_dir}, not {shard_id} in {data_dir}")
        member = cls(cfg, member_id, replicas, options)
        loop = asyncio.get_running_loop()
        if dir_lock is None:
            member._dir_lock = await loop.run_in_executor(None, member.files.lock)
            member._own_lock = True
        else:
            member._dir_lock = dir_lock
        try:
            await loop.run_in_executor(None, member._open_data, term_register)
        except BaseException:
            if member._own_lock and member._dir_lock is not None:
                member._dir_lock.release()
            raise
        if member._compaction is not None:
            member._compaction_task = loop.create_task(member._compact_forever())
        return member

    def _open_data(self, term_register: int) -> None:
        cfg = self.config
        try:
            manifest = self.files.read_manifest()
        except DataCorrupted as e:
            self._move_aside(f"its MANIFEST is damaged: {e}")
            manifest = None
            empty_reason: str | None = "damaged"
        else:
            empty_reason = None
        if manifest is not None:
            if manifest.shard_id != cfg.shard_id:
                raise InvalidRequest(f"{cfg.data_dir} holds the data of shard {manifest.shard_id}, not of "
                                     f"shard {cfg.shard_id}", shard=cfg.shard_id)
            if manifest.member is not None and manifest.member != self.member_id:
                raise InvalidRequest(f"{cfg.data_dir} holds member {manifest.member} of shard {cfg.shard_id}, "
                                     f"not member {self.member_id}", shard=cfg.shard_id)
        voter = manifest.voter if manifest is not None else True
        promised = manifest.promised_term if manifest is not None else 0
        if empty_reason is None and term_register > 0 and self.files.holds_no_data():
            empty_reason = "missing"
        if empty_reason is None:
            try:
                self._load(manifest.durable_lsn if manifest is not None else 0)
            except DataCorrupted as e:
                self._move_aside(str(e))
                empty_reason = "damaged"
        if empty_reason is not None:
            voter = False
            self.counters["learner_starts"] += 1
            log.warning("shard %d member %d: data %s in %s: starting as a learner with an empty log, to catch "
                        "up from the primary", cfg.shard_id, self.member_id, empty_reason, cfg.data_dir)
            self._load(0)
        base = manifest if manifest is not None and empty_reason is None else ShardManifest(cfg.shard_id)
        assert self.wal is not None
        self._write_manifest(base.with_member(self.member_id, voter, max(promised, term_register))
                             .with_durable_lsn(self._mark(self.wal.durable_lsn)))

    def _load(self, require_lsn: int) -> None:
        """Open the log and the applied state (snapshot) as a follower."""
        core = self._new_core()
        terms = Terms()
        snapshot_lsn = 0
        snap = self.files.load_snapshot()
        if snap is not None:
            snapshot_lsn, raw = snap
            state = msgpack.unpackb(raw, raw=False, strict_map_key=False)
            try:
                core.load_snapshot(state)
            except DataCorrupted as e:
                raise DataCorrupted(f"member {self.member_id}'s snapshot at LSN {snapshot_lsn}: {e.message}",
                                    **e.details) from None
            terms = Terms.from_list(state.get("terms"))
        pending: collections.deque[tuple[int, int, Any]] = collections.deque()

        def on_record(lsn: int, rtype: int, body: Any) -> None:
            if rtype == TERM_START:
                terms.start(body["t"], lsn)
            pending.append((lsn, rtype, body))

        wal = self.files.open_wal(replay_from_lsn=snapshot_lsn + 1, on_record=on_record, require_lsn=require_lsn)
        wal.on_new_segment = self._raise_mark
        self.wal, self.core, self.terms = wal, core, terms
        self._pending = pending
        self._applied_lsn = self._snapshot_lsn = snapshot_lsn
        self._commit_known = max(self._commit_known, snapshot_lsn)

    def _new_core(self) -> Participant:
        cfg = self.config
        self._close_history()
        self._history = open_history_store(cfg)
        return Participant(cfg.shard_id, 0, VersionedStore(cfg.history_limit, self._history, cfg.history_max_age_seconds),
                           DeliveryLog(cfg.delivery_log), max_resolved=cfg.max_resolved_txns)

    def _close_history(self) -> None:
        """Flush, sync and close the follower's on-disk history store, if open."""
        with self._history_lock:
            history, self._history = self._history, None
            if history is not None:
                history.close()

    def _move_aside(self, why: str) -> None:
        """Keep damaged files for a post-mortem, out of the way of an empty log."""
        cfg = self.config
        aside, moved = self.files.move_aside()
        log.warning("shard %d member %d: %s; moved %s to %s", cfg.shard_id, self.member_id, why,
                    ", ".join(moved) or "nothing", aside)

    # ---- the MANIFEST -------------------------------------------------------------

    @property
    def manifest(self) -> ShardManifest:
        return self._manifest

    def _mark(self, lsn: int) -> int:
        return 0 if self.config.wal.unsafe_no_fsync else lsn

    def _write_manifest(self, manifest: ShardManifest) -> None:
        with self._manifest_lock:
            self.files.write_manifest(manifest)
            self._manifest = manifest

    def _write_shard_manifest(self, _shard_dir: Path, manifest: ShardManifest, *, fsync: bool = True) -> None:
        """The primary's Shard replaces the MANIFEST: its mark and grace, the member's own fields."""
        with self._manifest_lock:
            current = self._manifest
            merged = current.with_durable_lsn(manifest.durable_lsn).with_grace(manifest.grace_seconds)
            self.files.write_manifest(merged, fsync=fsync)
            self._manifest = merged

    def _persist(self, *, voter: bool | None = None, promised_term: int | None = None,
                 durable_lsn: int | None = None) -> None:
        """Record member state durably before acting on it."""
        with self._manifest_lock:
            m = self._manifest
            new = m.with_member(self.member_id, m.voter if voter is None else voter,
                                m.promised_term if promised_term is None else promised_term)
            if durable_lsn is not None:
                new = new.with_durable_lsn(durable_lsn)
            self.files.write_manifest(new)
            self._manifest = new

    def _raise_mark(self, lsn: int) -> None:
        lsn = self._mark(lsn)
        with self._manifest_lock:
            if lsn <= self._manifest.durable_lsn:
                return
            try:
                new = self._manifest.with_durable_lsn(lsn)
                self.files.write_manifest(new)
                self._manifest = new
            except OSError:
                log.exception("shard %d member %d: could not update the MANIFEST", self.shard_id, self.member_id)

    # ---- state ----------------------------------------------------------------------

    @property
    def voter(self) -> bool:
        return self._manifest.voter

    @property
    def promised_term(self) -> int:
        return self._manifest.promised_term

    @property
    def durable_lsn(self) -> int:
        return self.wal.durable_lsn if self.wal is not None else 0

    @property
    def last_position(self) -> Position:
        """The position of the last durable record: what a promise reports (§2)."""
        return self.terms.position(self.durable_lsn)

    @property
    def applied_lsn(self) -> int:
        """As a follower: records applied to its own store (never beyond a commit index)."""
        return self._applied_lsn

    @property
    def commit_lsn(self) -> int:
        """The highest commit index known here (the primary's own when primary)."""
        if self.rwal is not None:
            return self.rwal.commit_lsn
        return self._commit_known

    @property
    def is_primary(self) -> bool:
        return self.role == PRIMARY

    def status(self) -> dict[str, Any]:
        """For ``oribus stats``: role, term, positions, lag."""
        out: dict[str, Any] = {"shard": self.shard_id, "member": self.member_id, "role": self.role,
                               "voter": self.voter, "promised_term": self.promised_term,
                               "last": list(self.last_position), "commit_lsn": self.commit_lsn,
                               "applied_lsn": self._applied_lsn, **self.counters}
        if self.rwal is not None:
            out["replication"] = self.rwal.stats
        return out

    def _check_open(self) -> Wal:
        if self.role == CLOSED or self.wal is None:
            raise Unavailable(f"shard {self.shard_id} member {self.member_id} is closed", shard=self.shard_id)
        return self.wal

    def _reply(self, ok: bool, durable: int | None = None) -> AppendReply:
        return AppendReply(ok=ok, term=self.promised_term,
                           durable_lsn=self.durable_lsn if durable is None else durable,
                           last=self.last_position, voter=self.voter)

    # ---- the server side: what the primary and candidates call ---------------------------

    def set_promised_term(self, term: int) -> None:
        """Take ``term`` (the etcd term register, read at start) as promised if it is higher,
        durably: a member whose promise was on a lost disk still refuses a deposed primary."""
        if term > self.promised_term:
            self._persist(promised_term=term)

    async def append(self, batch: AppendBatch) -> AppendReply:
        """Rules 1 and 2 of §3 (module docstring)."""
        return await carried_out(self._append_request(batch))

    async def _append_request(self, batch: AppendBatch) -> AppendReply:
        async with self._lock:
            self._check_open()
            if batch.term > self.promised_term or (self.role != FOLLOWER and batch.term >= self.promised_term):
                if self.role != FOLLOWER:
                    if batch.term <= self._own_term():
                        raise Unavailable(f"member {self.member_id} is the primary of term {self._own_term()}")
                    await self._leave_primary(batch.term)
                if batch.term > self.promised_term:
                    self._persist(promised_term=batch.term)
            return await self._append(batch)

    async def _append(self, batch: AppendBatch) -> AppendReply:
        wal = self._check_open()
        plan = plan_append(batch, promised_term=self.promised_term, terms=self.terms,
                           last_lsn=wal.last_lsn, floor=wal.first_lsn - 1)
        if not plan.ok:
            if plan.refusal == "damaged":
                log.warning("shard %d member %d: refused a damaged batch from member %d: %s", self.shard_id,
                            self.member_id, batch.primary, plan.detail)
            self.counters["refused_term" if plan.refusal == "term" else "refused_mismatch"] += 1
            return self._reply(False)
        if plan.truncate_after is not None:
            await self._truncate_after(plan.truncate_after)
        appended = plan.frames[plan.append_from:]
        if appended:
            wal.append_frames(batch.frames[appended[0].start:])
            for f in appended:
                if f.rtype == TERM_START:
                    self.terms.start(f.body["t"], f.lsn)
                self._pending.append((f.lsn, f.rtype, f.body))
        matched = batch.last_lsn
        if wal.durable_lsn < matched:
            # What it acknowledges is fsynced: the frames just appended, and any it already held
            # whose fsync has not finished (an earlier append cancelled while it waited for it).
            await wal.sync(matched)
        self.counters["appends"] += 1
        commit = min(batch.commit_lsn, matched)
        if commit > self._commit_known:
            self._commit_known = commit
        self._apply_to(min(self._commit_known, wal.durable_lsn))
        if becomes_voter(self.voter, self.terms, batch.term, matched, batch.commit_lsn):
            # Holds the serving primary's log up to its commit index: every acknowledged record (§7).
            failpoint("replica.before_voter")
            self._persist(voter=True)
            log.info("shard %d member %d: holds every record up to the commit index %d: now a voter",
                     self.shard_id, self.member_id, batch.commit_lsn)
        return self._reply(True, durable=matched)

    async def _truncate_after(self, lsn: int) -> None:
        wal = self._check_open()
        if lsn < self._applied_lsn:
            raise DataCorrupted(f"shard {self.shard_id} member {self.member_id}: asked to cut records after LSN "
                                f"{lsn}, below the applied LSN {self._applied_lsn} (committed records)")
        removed = wal.last_lsn - lsn
        log.warning("shard %d member %d: cutting a divergent tail of %d records after LSN %d", self.shard_id,
                    self.member_id, removed, lsn)
        while self._pending and self._pending[-1][0] > lsn:
            self._pending.pop()
        self.terms.truncate_after(lsn)
        if self._manifest.durable_lsn > lsn:
            self._persist(durable_lsn=self._mark(lsn))  # lowered first: the log may end here
        failpoint("replica.before_truncate")
        await wal.truncate_after(lsn)
        failpoint("replica.after_truncate")
        self.counters["truncated_records"] += removed

    def _apply_to(self, lsn: int) -> None:
        core = self.core
        assert core is not None
        pending = self._pending
        while pending and pending[0][0] <= lsn:
            record_lsn, rtype, body = pending.popleft()
            core.replay(rtype, body)
            self._applied_lsn = record_lsn
        core.store.older.flush()  # the versions replaced, to an on-disk history store's committer
        if (self._applied_lsn - self._snapshot_lsn >= self.config.snapshot_every_records
                and self._snapshot_task is None and self.role == FOLLOWER):
            self._snapshot_task = asyncio.get_running_loop().create_task(self._follower_snapshot())

    async def _follower_snapshot(self) -> None:
        """Snapshot the applied state (committed records only) and drop the log it covers."""
        try:
            async with self._lock:
                wal, core = self.wal, self.core
                if self.role != FOLLOWER or wal is None or core is None:
                    return
                lsn = self._applied_lsn
                state = core.to_snapshot()
                state["terms"] = self.terms.to_list(lsn)
                raw = msgpack.packb(state, use_bin_type=True)
                wal.roll()
                loop = asyncio.get_running_loop()
                # An on-disk history store holds the versions the snapshot leaves out: durable
                # first, before the snapshot lets the log below it go (as a Shard's snapshot).
                core.store.older.flush()
                await loop.run_in_executor(None, core.store.older.sync)
                await loop.run_in_executor(None, self.files.write_snapshot, lsn, raw)
                await loop.run_in_executor(None, wal.remove_segments_before, lsn + 1)
                self._snapshot_lsn = lsn
                self._raise_mark(max(lsn, wal.durable_lsn))
                self.counters["snapshots"] += 1
        except Exception:
            log.exception("shard %d member %d: snapshot failed", self.shard_id, self.member_id)
        finally:
            self._snapshot_task = None

    async def promise(self, term: int, candidate: int) -> PromiseReply:
        """A candidate of ``term`` asks for this member's promise (§5 step 2)."""
        return await carried_out(self._promise_request(term, candidate))

    async def _promise_request(self, term: int, candidate: int) -> PromiseReply:
        async with self._lock:
            self._check_open()
            self.counters["promises"] += 1
            if not may_promise(self.voter, self.promised_term, term):
                return PromiseReply(granted=False, term=self.promised_term, voter=self.voter,
                                    last=self.last_position)
            if term > self.promised_term:
                if self.role != FOLLOWER and term > self._own_term():
                    await self._leave_primary(term)
                self._persist(promised_term=term)
            log.info("shard %d member %d: promised term %d to member %d", self.shard_id, self.member_id,
                     term, candidate)
            return PromiseReply(granted=True, term=term, voter=True, last=self.last_position)

    async def install_snapshot(self, chunk: SnapshotChunk) -> AppendReply:
        """A primary's latest snapshot, in chunks; the log after it follows as batches (§7)."""
        return await carried_out(self._install_request(chunk))

    async def _install_request(self, chunk: SnapshotChunk) -> AppendReply:
        async with self._lock:
            self._check_open()
            if chunk.term < self.promised_term:
                return self._reply(False)
            if self.role != FOLLOWER:
                if chunk.term <= self._own_term():
                    raise Unavailable(f"member {self.member_id} is the primary of term {self._own_term()}")
                await self._leave_primary(chunk.term)
            if chunk.term > self.promised_term:
                self._persist(promised_term=chunk.term)
            if chunk.offset == 0:
                self._drop_incoming()
                self._incoming, self._incoming_lsn = CatchupReceiver(self.files.history_spill()), chunk.lsn
            incoming = self._incoming
            if incoming is None or chunk.lsn != self._incoming_lsn or chunk.offset != incoming.length:
                self._drop_incoming()
                return self._reply(False)
            incoming.feed(chunk.data)
            if incoming.carries_history and self.config.history_store == "memory":
                # Its snapshot holds only current versions: installed here, the history would be lost.
                log.error("shard %d member %d: member %d sends an on-disk history store, but this member keeps "
                          "its history in memory: start every member with the same --history-store",
                          self.shard_id, self.member_id, chunk.primary)
                self._drop_incoming()
                return self._reply(False)
            if not chunk.done:
                return self._reply(True)
            self._incoming = None
            if chunk.lsn <= self._applied_lsn:  # holds it already
                incoming.discard()
                return self._reply(True, durable=min(self.durable_lsn, chunk.lsn))
            try:
                snapshot_file, history_file = await asyncio.get_running_loop().run_in_executor(
                    None, lambda: incoming.finish(fsync=self.files.fsync))
                raw = decode_snapshot_file(snapshot_file, chunk.lsn, f"snapshot from member {chunk.primary}")
            except DataCorrupted:
                incoming.discard()
                log.warning("shard %d member %d: a damaged snapshot arrived", self.shard_id, self.member_id)
                return self._reply(False)
            await self._install(chunk.lsn, raw, history_file)
            self.counters["snapshots_installed"] += 1
            return self._reply(True, durable=chunk.lsn)

    def _drop_incoming(self) -> None:
        incoming, self._incoming = self._incoming, None
        if incoming is not None:
            incoming.discard()

    async def _install(self, lsn: int, raw: bytes, history_file: Path | None = None) -> None:
        """Replace the log by the snapshot at ``lsn`` (and an on-disk history store by the
        primary's ``history_file``). The member is a learner meanwhile: its records are gone
        before the snapshot is in place (a crash then must not leave a voter lacking records
        it acknowledged). The history file is in place before the snapshot: a snapshot that
        holds only current versions is never found without the versions it leaves out."""
        wal = self._check_open()
        state = msgpack.unpackb(raw, raw=False, strict_map_key=False)
        loop = asyncio.get_running_loop()
        if self.voter:
            self._persist(voter=False)
        self._persist(durable_lsn=0)
        await wal.close()
        self.wal = None

        def replace_files() -> None:
            self.files.delete_log()
            failpoint("replica.install_snapshot")  # the log is gone, the snapshot not yet there
            if self.config.history_store != "memory":
                self._close_history()
                self.files.replace_history(history_file)
            self.files.write_snapshot(lsn, raw)
            self._load(0)

        await loop.run_in_executor(None, replace_files)
        assert self.wal is not None
        self._commit_known = max(self._commit_known, lsn)
        self._raise_mark(lsn)
        log.info("shard %d member %d: installed a snapshot at LSN %d (terms %s)", self.shard_id, self.member_id,
                 lsn, state.get("terms"))

    # ---- becoming primary, and stepping down ---------------------------------------------

    def _own_term(self) -> int:
        return self.rwal.term if self.rwal is not None else 0

    async def become_primary(self, term: int, peers: Sequence[Peer]) -> Shard:
        """Serve term ``term`` (won through etcd, §5): append ``TERM_START``, wait until it is
        committed on a majority, recover as a restarted shard with epoch ``term``, return the
        serving ``Shard``. Raises ``Unavailable`` if deposed meanwhile (the member is then a
        follower again); cancelling it leaves the member a follower too."""
        async with self._lock:
            wal = self._check_open()
            if self.role != FOLLOWER:
                raise InvalidRequest(f"member {self.member_id} is already {self.role}")
            if not self.voter:
                raise InvalidRequest(f"member {self.member_id} is a learner: it cannot be elected")
            if term < self.promised_term:
                raise Unavailable(f"term {term} is below the promised term {self.promised_term}")
            if term <= self.terms.last_term:
                raise InvalidRequest(f"term {term} is not above the log's last term {self.terms.last_term}")
            if term > self.promised_term:
                self._persist(promised_term=term)
            if self._snapshot_task is not None:
                self._snapshot_task.cancel()
            rwal = ReplicatedWal(wal, self.terms, term=term, member_id=self.member_id, replicas=self.replicas,
                                 peers=peers, snapshot_source=self._snapshot_source,
                                 on_deposed=self._deposed, options=self.options,
                                 metrics_label=str(self.shard_id))
            self.rwal = rwal
            self.role = STARTING
            rwal.start()
            lsn = rwal.begin_term()
        log.info("shard %d member %d: term %d begins at LSN %d; waiting for a majority", self.shard_id,
                 self.member_id, term, lsn)
        try:
            await rwal.sync(lsn)
            async with self._lock:
                if self.rwal is not rwal or rwal.deposed is not None:
                    raise Unavailable(f"member {self.member_id} was deposed before term {term} began")
                # The Shard opens the history directory itself (recovery writes to it again).
                await asyncio.get_running_loop().run_in_executor(None, self._close_history)
                shard = self.shard_class(self.config, term, self, rwal)
                await shard._start(self._dir_lock)
                if lsn == 1:
                    # The group's first term: no primary ever served, no lease is out (§10 rule 3).
                    shard.core.writes_refused_until = shard.core.clock()
                self.shard = shard
                self.role = PRIMARY
                REPLICA_TAKEOVERS.labels(shard=str(self.shard_id)).inc()
        except BaseException:
            async with self._lock:
                if self.rwal is rwal:
                    await self._to_follower()
            raise
        log.info("shard %d member %d: primary of term %d (TERM_START at LSN %d committed)", self.shard_id,
                 self.member_id, term, lsn)
        return shard

    # ---- the age rule while following -----------------------------------------------------

    def compact_history(self) -> int:
        """One step of the age rule on the follower's store (as ``Shard.compact_history`` on a
        primary), by the core's wall clock; returns how many versions it dropped. Nothing while
        the member is primary or starting (its Shard's compaction runs then) or closed."""
        core = self.core
        if self._compaction is None or self.role != FOLLOWER or core is None:
            return 0
        dropped = drop_aged_versions(self._compaction, core.store, core.wall_clock())
        self.counters["history_dropped_by_age"] += dropped
        return dropped

    async def _compact_forever(self) -> None:
        while self.role != CLOSED:
            await asyncio.sleep(self.config.history_compaction_interval)
            async with self._lock:  # not in the middle of an install, which replaces the core
                try:
                    self.compact_history()
                except Exception:  # a failed step drops nothing more; the next one tries again
                    log.exception("shard %d member %d: history compaction step failed", self.shard_id,
                                  self.member_id)

    def _snapshot_source(self) -> tuple[int, CatchupData] | None:
        """The latest snapshot, and with an on-disk history store the engine's consistent
        copy, taken after the snapshot was read (``catchup.py``). Runs in a worker thread."""
        snap = self.files.snapshot_file()
        if snap is None or self.config.history_store == "memory":
            return snap
        # The engine open now: the Shard's while primary; the member's own while its term
        # starts (TERM_START not yet committed, no Shard yet), when a learner may already ask.
        # A snapshot sent without it would leave the learner none of the versions the
        # snapshot leaves to the engine (found by the simulation: oribus/sim/history.py).
        lsn, data = snap
        shard = self.shard
        if shard is not None:
            history_file = _engine_copy(shard.store.older)
        else:
            with self._history_lock:  # not closed under the copy
                history_file = _engine_copy(self._history)
        if history_file is None:  # the Shard is opening the engine: no consistent copy to send yet
            raise Unavailable(f"shard {self.shard_id} member {self.member_id}: the history store is not "
                              "open; the snapshot is sent once it is", shard=self.shard_id)
        return lsn, CatchupSource(data, history_file)

    def _deposed(self, term: int) -> None:
        """The ReplicatedWal saw a higher term: report it, and step down soon."""
        if self.on_deposed is not None:
            try:
                self.on_deposed(term)
            except Exception:
                log.exception("the on_deposed callback failed")
        asyncio.get_running_loop().create_task(self._step_down_after_deposed(term))

    async def _step_down_after_deposed(self, term: int) -> None:
        async with self._lock:
            if self.role in (PRIMARY, STARTING) and self.rwal is not None and self.rwal.deposed is not None:
                if term > self.promised_term:
                    self._persist(promised_term=term)
                await self._to_follower()

    async def _leave_primary(self, term: int) -> None:
        """A higher term exists (lock held): stop acknowledging at once, then step down."""
        if self.rwal is not None:
            self.rwal.depose(term)
        await self._to_follower()

    async def step_down(self) -> None:
        """Stop serving as primary (the lease was lost, or shutdown): the Shard is closed and
        the member reopens its log as a follower. A no-op for a follower."""
        await carried_out(self._step_down_request())

    async def _step_down_request(self) -> None:
        async with self._lock:
            if self.role in (PRIMARY, STARTING):
                await self._to_follower()

    async def _to_follower(self) -> None:
        """Close the primary's Shard (or the starting ReplicatedWal) and reload as a follower."""
        shard, rwal = self.shard, self.rwal
        self.shard = None
        self.rwal = None
        if shard is not None:
            with contextlib.suppress(Exception):
                await shard.close()  # closes rwal and the WAL, raises the mark
        elif rwal is not None:
            await rwal.stop()
            with contextlib.suppress(Exception):
                await rwal.wal.close()
        else:
            return
        self.wal = None
        self.role = FOLLOWER
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._load, self._manifest.durable_lsn)
        log.info("shard %d member %d: stepped down; a follower at %s", self.shard_id, self.member_id,
                 self.last_position)

    async def close(self) -> None:
        """Stop (as primary: close the Shard first); release the directory lock. Idempotent."""
        async with self._lock:
            if self.role == CLOSED:
                return
            if self._snapshot_task is not None:
                self._snapshot_task.cancel()
            if self._compaction_task is not None:
                self._compaction_task.cancel()
            shard, rwal, wal = self.shard, self.rwal, self.wal
            self.role = CLOSED
            self._drop_incoming()
            self.shard = self.rwal = None
            try:
                if shard is not None:
                    await shard.close()
                elif rwal is not None:
                    await rwal.close()
                elif wal is not None:
                    await wal.close()
                    if self.wal is not None:
                        await asyncio.get_running_loop().run_in_executor(None, self._raise_mark, wal.durable_lsn)
            finally:
                self.wal = None
                try:
                    await asyncio.get_running_loop().run_in_executor(None, self._close_history)
                finally:
                    if self._own_lock and self._dir_lock is not None:
                        self._dir_lock.release()
