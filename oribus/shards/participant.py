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
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from oribus.delivery_log import DeliveryLog
from oribus.errors import InvalidRequest, SessionExpired, Stale
from oribus.messages import (
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
        self.read_locks: dict[str, set[str]] = {}  # key -> txn ids

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
                raise InvalidRequest(
                    f"version {target} of {k!r} is no longer in its history "
                    f"(kept: {self.store.oldest_version(k)}..{cur})",
                    key=k, version=target,
                )
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

    def _begin(self, st: ShardTxn, *, one_phase: bool) -> Known | Refused | Pending | Nothing:
        seen = self.known(st.txn_id)
        if seen is not None:
            return Known(seen)
        # Order of refusals, the same on every path: SessionExpired (lost deliveries),
        # then InvalidRequest (e.g. a rollback target out of history), then Conflict.
        logged = self._logged_read_set(st)
        writes = self._resolve_writes(st)
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

    def begin_one_phase(self, st: ShardTxn) -> Known | Refused | Pending:
        """Validate and lock; after ``Pending.record`` is durable call ``apply_commit``."""
        result = self._begin(st, one_phase=True)
        assert not isinstance(result, Nothing), "a one-phase commit always holds its writes"
        return result

    # ---- two-phase commit --------------------------------------------------------

    def prepare(self, st: ShardTxn) -> Known | Refused | Pending | Nothing:
        """Phase one: validate, lock (no-wait), and hand back the PREPARE record."""
        return self._begin(st, one_phase=False)

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

    def begin_decide(self, txn_id: str, commit: bool) -> tuple[TxnState, WalRecord | None]:
        """On the primary: the commit point. A compare-and-set PREPARED -> COMMITTED/ABORTED.

        Returns the state the transaction will have and the record to make
        durable (None when nothing changes). A commit of a transaction that is
        not prepared here is refused: it becomes (or stays) ABORTED, so a late
        commit can never follow an abort.
        """
        txn = self.known(txn_id)
        if txn is not None and txn.resolved:
            assert txn.state is not None  # resolved: COMMITTED or ABORTED
            return txn.state, None
        if txn is None or not commit:
            return TxnState.ABORTED, (int(RecordType.ABORT), {"i": txn_id})
        return TxnState.COMMITTED, (int(RecordType.COMMIT), {"i": txn_id})

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
