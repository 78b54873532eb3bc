"""The transaction participant of one shard: validation, locks, outcomes (sans-IO).

No sockets, no sleeps, no asyncio. Each operation returns what happened and,
when state must become durable first, the WAL record to append; the shard
shell (``shard.py``) appends it, waits for the fsync and then calls the
matching ``apply_*`` method. That split is what lets the same core run in
the embedded engine, the gRPC server and the deterministic simulator.

Validation is the ORI rule (specs/engine.md, "The commit rule (ORI)"), for
this shard's keys:

1. every logged delivery in the commit's scope (the server's own record of
   what it returned to the session) must still be the current version, and
   so must every explicit read entry — an explicit entry never replaces a
   logged one, both are checked;
2. every expected version must be the current version;
3. a written key the session read is checked like any read (so there are no
   lost updates by default); blind writes pass unless the session is strict;
4. no key written or read may be locked by another transaction: write
   intents block readers and writers, read locks block writers (no-wait).

A token (epoch, incarnation) proves the session's deliveries here are the
ones it saw: a different epoch means this shard restarted and lost them; a
different incarnation means the session expired. Either refuses the commit
with SessionExpired — it never passes with a smaller read set.

Read-only participants (specs/PROTOCOL.md §5.8). A shard that writes nothing
for a commit is not prepared but validated (``validate_reads``): the same
checks, then read locks held in memory for a **lease** of
``read_lease_seconds`` on this shard's monotonic clock — no record, no fsync.
An expired lease no longer blocks a writer; ``release_lease`` ends one at
once. Three rules make that safe although a crash loses the leases:

* the commit point of a commit that relies on leases (a one-phase commit here,
  or the primary's decision) refuses it when this shard's wall clock is past
  the leases' deadline less ``clock_skew_seconds`` (``Late``);
* a shard refuses every new write intent (``Unavailable``) until
  ``read_lease_seconds + 2 * clock_skew_seconds`` have passed since it was
  created — any lease its previous life granted has ended by then (the
  restart grace, off only where one process holds every shard and every
  coordinator);
* the coordinator releases leases only once the outcome is known.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from oribus.delivery_log import DeliveryLog
from oribus.errors import InvalidRequest, SessionExpired, Stale, Unavailable
from oribus.messages import (
    LEASE_EXPIRED,
    ReadItem,
    ReadReply,
    ReadRequest,
    Scope,
    ShardTxn,
    TxnOutcome,
    TxnState,
    TxnStatus,
    Vote,
    VoteKind,
    Write,
)
from oribus.shards.store import VersionedStore
from oribus.shards.txn import RecordType, Txn
from oribus.shards.wal.record import TERM_START
from oribus.types import SessionRef

WalRecord = tuple[int, dict]


@dataclass(slots=True)
class Blocked:
    """The operation touches keys under other transactions' locks."""

    txn_ids: set[str]


@dataclass(slots=True)
class Refused:
    """Validation failed: these keys are stale, expected elsewhere, or locked."""

    stale: list[Stale]
    blockers: set[str]  # transactions holding the locks among ``stale``

    @property
    def only_locked(self) -> bool:
        return all(s.reason == "locked" for s in self.stale)


@dataclass(slots=True)
class Pending:
    """Validated and locked; durable once ``record`` is fsynced."""

    txn: Txn
    record: WalRecord


@dataclass(slots=True)
class Nothing:
    """Validated; a non-primary participant with nothing to write or lock needs no phase two."""


@dataclass(slots=True)
class Known:
    """The transaction id was seen before (idempotent retry)."""

    txn: Txn


@dataclass(slots=True)
class Late:
    """The commit point is past the read leases' deadline (less the skew bound): refused."""

    deadline: float  # the coordinator's wall clock, seconds since the epoch
    now: float  # this shard's wall clock when it refused


@dataclass(slots=True)
class Leased:
    """A read-only participant validated and holds read locks for ``seconds``."""

    seconds: float


@dataclass(slots=True)
class Lease:
    """The read locks a read-only participant holds for one transaction, in memory only."""

    keys: set[str]
    expires: float  # on the participant's monotonic clock


class Participant:
    """Validation, locking and transaction records of one shard."""

    def __init__(
        self,
        shard_id: int,
        epoch: int,
        store: VersionedStore,
        delivery_log: DeliveryLog,
        *,
        max_resolved: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        read_lease_seconds: float = 2.0,
        clock_skew_seconds: float = 0.0,
        restart_grace: bool = False,  # the shard passes ShardConfig.restart_grace (on by default)
        unsafe_disable_validation: bool = False,
    ) -> None:
        self.shard_id = shard_id
        # Demo/testing only (``oribus demo`` shows what ORI prevents): skip the stale-read,
        # expected-version and blind-write checks, so stale commits are ACCEPTED. Locks and
        # transaction records stay, so commits are still atomic. Never set it in production.
        self.unsafe_disable_validation = unsafe_disable_validation
        self.epoch = epoch
        self.store = store
        self.dlog = delivery_log
        self.max_resolved = max_resolved
        self.clock = clock
        self.prepared: dict[str, Txn] = {}  # PREPARED (and one-phase in flight)
        self.resolved: OrderedDict[str, Txn] = OrderedDict()  # COMMITTED / ABORTED, oldest first
        # COMMITTED decisions of multi-shard transactions this shard is primary of. Never
        # evicted until released: a participant still PREPARED asks for the outcome, and a
        # forgotten commit would be presumed aborted there — a partial commit.
        self.decisions: dict[str, Txn] = {}
        self.write_locks: dict[str, str] = {}  # key -> txn id (write intent)
        self.read_locks: dict[str, set[str]] = {}  # key -> txn ids (prepared ones', and leases')
        # Read-only participants (PROTOCOL.md §5.8): leases by txn id, in the order they end
        # (a renewal moves one to the back; one ending a little later than its place is
        # only held a little longer, which is safe).
        self.wall_clock = wall_clock  # deadlines are the coordinator's wall clock
        self.read_lease_seconds = read_lease_seconds
        self.clock_skew_seconds = clock_skew_seconds
        self.leases: OrderedDict[str, Lease] = OrderedDict()
        # The restart grace: no new write intent before this (monotonic clock); a lease this
        # shard's previous life granted may still be relied on by a commit until then.
        grace = read_lease_seconds + 2 * clock_skew_seconds if restart_grace else 0.0
        self._started = clock()
        self.writes_refused_until = self._started + grace

    def require_grace(self, seconds: float) -> None:
        """Make the restart grace last at least ``seconds`` from this life's start: an earlier life
        may have granted longer leases than this one's configuration does (the shard's MANIFEST
        keeps their bound)."""
        if self.writes_refused_until:
            self.writes_refused_until = max(self.writes_refused_until, self._started + seconds)

    # ---- reads -----------------------------------------------------------------

    def read(self, req: ReadRequest) -> ReadReply | Blocked:
        """Return current versions, recording each as a delivery to the session.

        A key under a write intent is not read: the caller waits for the
        transaction's outcome (readers never see a partial commit).
        """
        blockers = {t for k in req.keys if (t := self.write_locks.get(k)) is not None}
        if blockers:
            return Blocked(blockers)
        items = []
        detail = req.detail
        for key in req.keys:
            e = self.store.current(key)
            if e is None:
                items.append(ReadItem(key, None, 0))
            elif detail:
                items.append(ReadItem(key, e.value, e.version, e.agent, e.committed_at))
            else:
                items.append(ReadItem(key, e.value, e.version))
        skipped: list[str] = []
        if req.record:
            recorded = items
            if req.only_new:
                have = self.dlog.delivered(req.session)
                skipped = [i.key for i in items if i.key in have]
                recorded = [i for i in items if i.key not in have and i.value is not None]
            inc, seq = self.dlog.record_many(
                req.session, ((self.store.intern(i.key), i.version) for i in recorded)
            )
        else:
            inc, seq = self.dlog.incarnation_of(req.session) or 0, 0
        return ReadReply(items, (self.epoch, inc), seq, skipped)

    # ---- validation --------------------------------------------------------------

    def _logged_read_set(self, st: ShardTxn) -> dict[str, int]:
        incarnation = None
        if st.token is not None:
            epoch, incarnation = st.token
            if epoch != self.epoch:
                raise SessionExpired(
                    f"shard {self.shard_id} restarted since session {st.session} read from it "
                    f"(epoch {epoch} -> {self.epoch}); its deliveries there are lost — "
                    "reset the session and read again",
                    shard=self.shard_id,
                )
        if st.scope is Scope.SESSION:
            return self.dlog.read_set(st.session, incarnation=incarnation)
        if st.since_seq is None:
            if incarnation is not None:
                self.dlog.read_set(st.session, incarnation=incarnation, since_seq=1 << 62)
            return {}
        return self.dlog.read_set(st.session, incarnation=incarnation, since_seq=st.since_seq)

    def validate(
        self, st: ShardTxn, logged: dict[str, int] | None = None
    ) -> tuple[list[Stale], set[str], dict[str, int]]:
        """Check the ORI rule for this shard. Returns (offending keys, lock holders, logged reads)."""
        if logged is None:
            logged = self._logged_read_set(st)
        version = self.store.version
        stale: list[Stale] = []
        reported: set[str] = set()
        written = st.written_keys
        if not self.unsafe_disable_validation:  # demo/testing only, see __init__
            for k, v in logged.items():
                cur = version(k)
                if cur != v:
                    stale.append(Stale(k, v, cur, "stale_read"))
                    reported.add(k)
            for k, v in st.read_set.items():
                cur = version(k)
                if cur != v and k not in reported:
                    stale.append(Stale(k, v, cur, "stale_read"))
                    reported.add(k)
            for k, e in st.expect.items():
                cur = version(k)
                if cur != e:
                    stale.append(Stale(k, e, cur, "expected_version"))
                    reported.add(k)
            if st.strict:
                for k in written:
                    if k not in logged and k not in st.read_set and k not in st.expect:
                        stale.append(Stale(k, None, version(k), "blind_write"))
                        reported.add(k)
        blockers: set[str] = set()
        me = st.txn_id
        for k in (*written, *logged, *st.read_set, *st.expect):
            holder = self.write_locks.get(k)
            if holder is not None and holder != me:
                blockers.add(holder)
                if k not in reported:
                    reported.add(k)
                    stale.append(Stale(k, logged.get(k, st.read_set.get(k)), version(k), "locked"))
        for k in written:
            readers = self.read_locks.get(k)
            if readers and (readers - {me}):
                blockers |= readers - {me}
                if k not in reported:
                    reported.add(k)
                    stale.append(Stale(k, logged.get(k), version(k), "locked"))
        return stale, blockers, logged

    def _resolve_writes(self, st: ShardTxn) -> dict[str, Write]:
        writes: dict[str, Write] = {}
        for k, raw in st.writes.items():
            writes[k] = Write(self.store.version(k) + 1, raw, raw is None)
        for k, target in st.rollback.items():
            if k in writes:
                raise InvalidRequest(f"key {k!r} is both written and rolled back", key=k)
            cur = self.store.version(k)
            if target < 0 or target > cur:
                raise InvalidRequest(
                    f"cannot roll {k!r} back to version {target}: current version is {cur}",
                    key=k, version=target,
                )
            if target == 0:
                writes[k] = Write(cur + 1, None, True)
                continue
            e = self.store.entry_at(k, target)
            if e is None:
                # HistoryTruncated (an InvalidRequest) names the oldest version kept and the
                # retention rule that dropped this one. The value is copied into the write
                # now: a prepared rollback never needs its target again, whatever retention
                # drops before the decision (specs/engine.md "Retention").
                raise self.store.not_kept(k, target, f"cannot roll {k!r} back")
            writes[k] = Write(cur + 1, e.value, e.deleted)
        return writes

    def _lock(self, txn: Txn) -> None:
        for k in txn.writes:
            self.write_locks[k] = txn.txn_id
        for k in txn.read_keys:
            self.read_locks.setdefault(k, set()).add(txn.txn_id)

    def _unlock(self, txn: Txn) -> None:
        for k in txn.writes:
            if self.write_locks.get(k) == txn.txn_id:
                del self.write_locks[k]
        for k in txn.read_keys:
            holders = self.read_locks.get(k)
            if holders is not None:
                holders.discard(txn.txn_id)
                if not holders:
                    del self.read_locks[k]

    def known(self, txn_id: str) -> Txn | None:
        return self.prepared.get(txn_id) or self.decisions.get(txn_id) or self.resolved.get(txn_id)

    def _begin(self, st: ShardTxn, *, one_phase: bool) -> Known | Refused | Pending | Nothing | Late:
        seen = self.known(st.txn_id)
        if seen is not None:
            return Known(seen)
        # Order of refusals, the same on every path: SessionExpired (lost deliveries),
        # then InvalidRequest (e.g. a rollback target out of history), then Conflict.
        logged = self._logged_read_set(st)
        writes = self._resolve_writes(st)
        if writes:
            self.check_no_grace()
        if one_phase and st.deadline is not None and self.past_deadline(st.deadline):
            return Late(st.deadline, self.wall_clock())
        if self.leases:
            self.expire_leases()
        stale, blockers, logged = self.validate(st, logged)
        if stale:
            return Refused(stale, blockers)
        read_keys = {self.store.intern(k) for k in (*logged, *st.read_set, *st.expect)}
        read_keys.difference_update(writes)
        if not one_phase and not writes and not read_keys and st.primary != self.shard_id:
            # only the token was checked here: nothing to hold until the decision
            return Nothing()
        txn = Txn(
            txn_id=st.txn_id,
            session=st.session,
            primary=st.primary,
            participants=tuple(st.participants) or (self.shard_id,),
            writes=writes,
            # a one-phase commit holds its locks only while its record is fsynced: its
            # reads are validated at this instant, so it needs no read locks
            read_keys=() if one_phase else tuple(read_keys),
            committed_at=st.committed_at,
            prepared_at=self.clock(),
            one_phase=one_phase,
        )
        txn.transition(TxnState.PREPARED)
        self.prepared[txn.txn_id] = txn
        self._lock(txn)
        rtype = RecordType.COMMIT_ONE_PHASE if one_phase else RecordType.PREPARE
        body = txn.one_phase_body() if one_phase else txn.prepare_body()
        return Pending(txn, (int(rtype), body))

    # ---- one-phase commit --------------------------------------------------------

    def begin_one_phase(self, st: ShardTxn) -> Known | Refused | Pending | Late:
        """Validate and lock; after ``Pending.record`` is durable call ``apply_commit``.

        With ``st.deadline`` (read-only participants hold leases for it) this step is the
        commit point: past the deadline less the skew bound it is refused (``Late``).
        """
        result = self._begin(st, one_phase=True)
        assert not isinstance(result, Nothing), "a one-phase commit always takes part"
        return result

    # ---- two-phase commit --------------------------------------------------------

    def prepare(self, st: ShardTxn) -> Known | Refused | Pending | Nothing:
        """Phase one: validate, lock (no-wait), and hand back the PREPARE record."""
        result = self._begin(st, one_phase=False)
        assert not isinstance(result, Late), "only a commit point checks the deadline"
        return result

    # ---- read-only participants: leases (PROTOCOL.md §5.8) -------------------------

    def validate_reads(self, st: ShardTxn) -> Refused | Leased | Nothing:
        """Validate a part that writes nothing and hold its read locks for a lease.

        The checks and their order are those of ``prepare`` (SessionExpired, then
        InvalidRequest, then Conflict); nothing waits and nothing is logged. A second
        validation of the same id (a retry) validates again and extends the lease: the
        keys are the union, the end the later one — a lease is never shortened, so an
        earlier attempt still in flight stays covered.
        """
        logged = self._logged_read_set(st)
        if st.written_keys:
            raise InvalidRequest(
                f"transaction {st.txn_id}: a read-only validation on shard {self.shard_id} "
                "carries writes", shard=self.shard_id,
            )
        stale, blockers, logged = self.validate(st, logged)
        if stale:
            return Refused(stale, blockers)
        keys = {self.store.intern(k) for k in (*logged, *st.read_set, *st.expect)}
        if not keys:
            return Nothing()  # only the token was checked: nothing to hold
        seconds = self.read_lease_seconds
        expires = self.clock() + seconds
        lease = self.leases.pop(st.txn_id, None)
        if lease is None:
            lease = Lease(set(), expires)
        lease.expires = max(lease.expires, expires)
        self.leases[st.txn_id] = lease  # to the back: it ends after those granted before
        me = st.txn_id
        for k in keys - lease.keys:
            self.read_locks.setdefault(k, set()).add(me)
        lease.keys |= keys
        return Leased(seconds)

    def withdraw(self, st: ShardTxn) -> Known | Refused:
        """The coordinator will not commit ``st`` here (a read-only participant refused it).

        A known id answers from its record (a retry whose earlier attempt committed). Otherwise
        the id gets an ABORTED tombstone first — a copy of an earlier attempt still on its way
        can then no longer commit — and the part is checked as ``prepare`` would check it, so
        the refusal names every offending key of every participant, in the usual order:
        SessionExpired, InvalidRequest (raised), then the keys (``Refused``).
        """
        seen = self.known(st.txn_id)
        if seen is not None:
            return Known(seen)
        self.apply_abort(st.txn_id)
        logged = self._logged_read_set(st)
        self._resolve_writes(st)
        stale, blockers, _ = self.validate(st, logged)
        return Refused(stale, blockers)

    def release_lease(self, txn_id: str) -> bool:
        """End a lease now (the coordinator knows the outcome). False if there was none."""
        lease = self.leases.pop(txn_id, None)
        if lease is None:
            return False
        self._unlock_lease(txn_id, lease)
        return True

    def expire_leases(self) -> list[str]:
        """End every lease whose time has passed; returns their transaction ids."""
        now = self.clock()
        ended = []
        while self.leases:
            txn_id, lease = next(iter(self.leases.items()))
            if lease.expires > now:
                break
            del self.leases[txn_id]
            self._unlock_lease(txn_id, lease)
            ended.append(txn_id)
        return ended

    def lease_left(self, txn_id: str) -> float | None:
        """Seconds until a lease ends on its own (None: no such lease)."""
        lease = self.leases.get(txn_id)
        return None if lease is None else max(0.0, lease.expires - self.clock())

    def _unlock_lease(self, txn_id: str, lease: Lease) -> None:
        for k in lease.keys:
            holders = self.read_locks.get(k)
            if holders is not None:
                holders.discard(txn_id)
                if not holders:
                    del self.read_locks[k]

    def may_wait(self, st: ShardTxn, blockers: set[str]) -> bool:
        """May a one-phase commit blocked by ``blockers`` wait for them (wait-die)?

        A commit with a deadline holds read leases on other shards while it waits here, and
        a lease holder may itself be waiting, at its own writer, for one of those leases: a
        deadlock until the lock wait runs out, both refused. Write intents never wait for
        anything (a one-phase commit takes them at its commit point, a prepared transaction
        waits only for its decision), so only leases can close such a cycle. A commit
        therefore waits for a lease only if its id is smaller than the holder's, and is
        refused at once otherwise: along any chain of waits the ids increase, so no chain
        comes back to where it started. A commit without a deadline holds nothing elsewhere
        and may wait for anything.
        """
        if st.deadline is None:
            return True
        me = st.txn_id
        return not any(b in self.leases and b < me for b in blockers)

    def past_deadline(self, deadline: float) -> bool:
        """Is this shard's wall clock past ``deadline`` less the skew bound (PROTOCOL.md §5.8)?"""
        return self.wall_clock() > deadline - self.clock_skew_seconds

    def grace_left(self) -> float:
        """Seconds of the restart grace still to run (0 once it is over)."""
        return max(0.0, self.writes_refused_until - self.clock())

    def check_no_grace(self) -> None:
        """Refuse a new write intent during the restart grace (PROTOCOL.md §5.8)."""
        if self.writes_refused_until and self.clock() < self.writes_refused_until:
            left = self.writes_refused_until - self.clock()
            raise Unavailable(
                f"shard {self.shard_id} started less than {self.read_lease_seconds + 2 * self.clock_skew_seconds:g}s "
                f"ago and takes no write for {left:.2f}s more: read leases it granted before it "
                "restarted may still be relied on; retry",
                shard=self.shard_id, retry_after=round(left, 3),
            )
        self.writes_refused_until = 0.0  # over for good: the clock is not read again

    def vote_for(self, result: Known | Refused | Pending | Nothing) -> Vote:
        if isinstance(result, Refused):
            return Vote(VoteKind.NO, stale=result.stale)
        if isinstance(result, Nothing):
            return Vote(VoteKind.NOTHING)
        # A YES vote carries the versions this shard will install: its write intents fix
        # them at prepare time, so the coordinator knows every new version once the votes
        # are in, whether or not this shard answers its finish (PROTOCOL.md §5.3).
        if isinstance(result, Pending):
            return Vote(VoteKind.YES, versions=result.txn.versions)
        txn = result.txn
        if txn.state is TxnState.COMMITTED:
            return Vote(VoteKind.COMMITTED, versions=txn.versions)
        if txn.state is TxnState.PREPARED:
            return Vote(VoteKind.YES, versions=txn.versions)
        return Vote(VoteKind.NO, stale=[Stale(k, None, self.store.version(k), "aborted") for k in txn.writes])

    def begin_decide(
        self, txn_id: str, commit: bool, deadline: float | None = None
    ) -> tuple[TxnState, WalRecord | None, str]:
        """On the primary: the commit point. A compare-and-set PREPARED -> COMMITTED/ABORTED.

        Returns the state the transaction will have, the record to make durable
        (None when nothing changes) and why it aborts when asked to commit
        (``LEASE_EXPIRED``, or ""). A commit of a transaction that is not
        prepared here is refused: it becomes (or stays) ABORTED, so a late
        commit can never follow an abort. So is a commit past ``deadline`` less
        the skew bound: the read leases it relies on may have ended (§5.8).
        """
        txn = self.known(txn_id)
        if txn is not None and txn.resolved:
            assert txn.state is not None  # resolved: COMMITTED or ABORTED
            return txn.state, None, ""
        if txn is None or not commit:
            return TxnState.ABORTED, (int(RecordType.ABORT), {"i": txn_id}), ""
        if deadline is not None and self.past_deadline(deadline):
            return TxnState.ABORTED, (int(RecordType.ABORT), {"i": txn_id}), LEASE_EXPIRED
        return TxnState.COMMITTED, (int(RecordType.COMMIT), {"i": txn_id}), ""

    # ---- outcomes (after the record is durable, or on replay) -----------------------

    def apply_commit(self, txn_id: str) -> TxnOutcome:
        """Make a prepared (or one-phase) transaction's writes visible and release it."""
        txn = self.known(txn_id)
        if txn is None:
            raise InvalidRequest(f"unknown transaction {txn_id}")
        if txn.resolved:
            return self.outcome(txn_id)
        txn.transition(TxnState.COMMITTED)
        for k, w in txn.writes.items():
            self.store.apply(k, w.version, w.value, w.deleted, txn.session, txn.txn_id, txn.committed_at)
        self._unlock(txn)
        self.prepared.pop(txn_id, None)
        self._remember(txn)
        versions = txn.versions
        token = None
        if versions:
            inc = self.dlog.advance(txn.session, {self.store.intern(k): v for k, v in versions.items()})
            token = (self.epoch, inc)
        return TxnOutcome(TxnState.COMMITTED, versions, token=token)

    def apply_abort(self, txn_id: str) -> TxnOutcome:
        """Release a prepared transaction, or leave an ABORTED tombstone for an unknown one."""
        txn = self.known(txn_id)
        if txn is None:
            txn = Txn(txn_id, SessionRef("", ""))
            txn.transition(TxnState.ABORTED)
            self._remember(txn)
            return TxnOutcome(TxnState.ABORTED)
        if txn.state is TxnState.PREPARED:
            txn.transition(TxnState.ABORTED)
            self._unlock(txn)
            self.prepared.pop(txn_id, None)
            self._remember(txn)
            return TxnOutcome(TxnState.ABORTED)
        return self.outcome(txn_id)

    def cancel_unlogged(self, txn_id: str) -> None:
        """A transaction whose record could not be made durable (a one-phase commit, or a
        prepare whose PREPARE record failed): forget it entirely and release its locks."""
        txn = self.prepared.pop(txn_id, None)
        if txn is not None:
            self._unlock(txn)

    def outcome(self, txn_id: str) -> TxnOutcome:
        """What this shard knows of a transaction's outcome (unknown reads as ABORTED)."""
        txn = self.known(txn_id)
        if txn is None:
            return TxnOutcome(TxnState.ABORTED)
        if txn.state is TxnState.COMMITTED:
            inc = self.dlog.incarnation_of(txn.session)
            return TxnOutcome(TxnState.COMMITTED, txn.versions, token=None if inc is None else (self.epoch, inc))
        assert txn.state is not None  # every known transaction has a state
        return TxnOutcome(txn.state)

    def _remember(self, txn: Txn, *, released: bool = False) -> None:
        txn.drop_values()  # applied (or aborted): outcomes keep versions, the store keeps values
        if (
            not released
            and txn.state is TxnState.COMMITTED
            and txn.primary == self.shard_id
            and len(txn.participants) > 1
        ):
            self.decisions[txn.txn_id] = txn
            return
        self.resolved[txn.txn_id] = txn
        while len(self.resolved) > self.max_resolved:
            self.resolved.popitem(last=False)

    def release(self, txn_id: str) -> bool:
        """Every participant has applied this decision: it may now be forgotten (LRU)."""
        txn = self.decisions.pop(txn_id, None)
        if txn is None:
            return False
        self._remember(txn, released=True)
        return True

    def status(self, txn_id: str) -> TxnStatus:
        txn = self.known(txn_id)
        if txn is None:
            return TxnStatus(None, 0, (), 0.0)
        return TxnStatus(txn.state, txn.primary, txn.participants, self.clock() - txn.prepared_at)

    def expired(self, older_than: float) -> list[Txn]:
        """Prepared two-phase transactions older than ``older_than`` seconds."""
        now = self.clock()
        return [t for t in self.prepared.values() if not t.one_phase and now - t.prepared_at > older_than]

    # ---- recovery ----------------------------------------------------------------

    def replay(self, rtype: int, body: dict) -> None:
        """Apply one WAL record during recovery (idempotent: records may precede the snapshot)."""
        if rtype == TERM_START:  # a replica group's start of a term: no shard state
            return
        txn_id = body["i"]
        seen = self.known(txn_id)
        if rtype == RecordType.PREPARE:
            if seen is None:
                txn = Txn.from_body(body)
                txn.prepared_at = self.clock()
                txn.transition(TxnState.PREPARED)
                self.prepared[txn_id] = txn
                self._lock(txn)
        elif rtype == RecordType.COMMIT_ONE_PHASE:
            if seen is None:
                txn = Txn.from_body(body)
                txn.one_phase = True
                txn.transition(TxnState.PREPARED)
                self.prepared[txn_id] = txn
                self._lock(txn)
                self._apply_replayed(txn)
        elif rtype == RecordType.COMMIT:
            if seen is not None and seen.state is TxnState.PREPARED:
                self._apply_replayed(seen)
        elif rtype == RecordType.ABORT:
            if seen is None or seen.state is TxnState.PREPARED:
                self.apply_abort(txn_id)
        elif rtype == RecordType.RELEASE:
            self.release(txn_id)
        else:
            raise ValueError(f"unknown WAL record type {rtype}")

    def _apply_replayed(self, txn: Txn) -> None:
        txn.transition(TxnState.COMMITTED)
        for k, w in txn.writes.items():
            self.store.apply(k, w.version, w.value, w.deleted, txn.session, txn.txn_id, txn.committed_at)
        self._unlock(txn)
        self.prepared.pop(txn.txn_id, None)
        self._remember(txn)

    def to_snapshot(self) -> dict:
        txns = [t.snapshot_form() for t in self.resolved.values()]
        txns += [t.snapshot_form(released=False) for t in self.decisions.values()]
        txns += [t.snapshot_form() for t in self.prepared.values() if not t.one_phase]
        return {"store": self.store.to_snapshot(), "txns": txns}

    def load_snapshot(self, data: dict) -> None:
        self.store.load_snapshot(data["store"])
        for state, body in data["txns"]:
            txn = Txn.from_body(body)
            txn.transition(TxnState(state))
            if txn.state is TxnState.PREPARED:
                txn.prepared_at = self.clock()
                self.prepared[txn.txn_id] = txn
                self._lock(txn)
            else:
                self._remember(txn, released=body.get("rel", True))
