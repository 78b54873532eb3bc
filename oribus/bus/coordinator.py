"""The commit coordinator: 1PC on one shard, 2PC across shards (Sinfonia-style).

The coordinator keeps nothing durable. The path depends on the writers among
the participants (specs/PROTOCOL.md §5.1):

* one participant: ``commit_one_phase`` there;
* one writer and read-only participants: ``validate`` on the read-only ones
  concurrently (each holds its read locks for a lease, in memory), then
  ``commit_one_phase`` on the writer with the leases' deadline, then the leases
  are released without waiting (PROTOCOL.md §5.8);
* several writers: two phases among the writers, the read-only participants
  validated concurrently with phase one:

  1. prepare on every writer — each validates its part of the read set from
     its own delivery log, locks (no-wait) and logs PREPARE;
  2. if every vote is YES, ``decide(commit)`` on the primary (the shard of the
     smallest written key) with the deadline: its durable COMMITTED record is
     the commit point; otherwise ``decide(abort)``, whose ABORTED record (or
     tombstone, when the primary never prepared) forbids a late commit;
  3. ``finish`` on the other writers (not awaited for durability: a writer that
     loses it asks the primary on recovery);
* no writer, several participants: ``validate`` everywhere; the commit point
  is the arrival of the last vote, within the shortest lease.

Leases are released only once the outcome is known; while it is not
(``Unavailable``) they run out by themselves.

Recovery of an abandoned transaction (``recover``) asks the primary; a primary
that has no outcome yet is made to abort, which is always safe.

A Conflict lists every offending key from every participant.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping

from oribus import tracing
from oribus.bus.metrics import CommitMetrics
from oribus.contract import CommitRequest, CommitResult, ShardService
from oribus.errors import (
    Aborted,
    Conflict,
    InvalidRequest,
    OribusError,
    SessionExpired,
    Stale,
    Unavailable,
)
from oribus.messages import (
    LEASE_EXPIRED,
    Scope,
    ShardTxn,
    Token,
    TxnOutcome,
    TxnRef,
    TxnState,
    Vote,
    VoteKind,
)

log = logging.getLogger("oribus.coordinator")


def conflict_from(stale: list[Stale], commit_id: str) -> Conflict:
    if stale and all(s.reason == "aborted" for s in stale):
        return Aborted(f"transaction {commit_id} was aborted earlier", stale=stale, commit_id=commit_id)
    if not stale:
        return Aborted(f"transaction {commit_id} was aborted", commit_id=commit_id)
    return Conflict(stale=sorted(stale), commit_id=commit_id)


def _precedence(e: BaseException) -> int:
    if isinstance(e, SessionExpired):
        return 0
    if isinstance(e, InvalidRequest):
        return 1
    return 2


def _lease_expired(commit_id: str, deadline: float) -> Aborted:
    return Aborted(
        f"transaction {commit_id} was aborted: its commit point came after the deadline of the "
        "read locks its read-only shards held for it (their lease ran out, PROTOCOL.md §5.8); "
        "nothing was written — read again and retry",
        commit_id=commit_id, reason=LEASE_EXPIRED, deadline=deadline,
    )


def _strongest_error(results: list) -> BaseException | None:
    """The refusal that is not a conflict to report: SessionExpired, then InvalidRequest, then the rest."""
    error: BaseException | None = None
    for r in results:
        if isinstance(r, BaseException) and (error is None or _precedence(r) < _precedence(error)):
            error = r
    return error


def _never_committed(results: list) -> bool:
    """Do these prepare answers prove that no attempt of this commit id can have committed?

    A participant looks up its record of the id before anything else, so a NO vote, a
    SessionExpired or an InvalidRequest comes from one that was never PREPARED for it (or
    saw it aborted) — and a commit needs every participant prepared. YES votes and
    unreachable participants prove nothing: an earlier attempt of the same id (a client
    retry) may have committed at the primary.
    """
    for r in results:
        if isinstance(r, BaseException):
            if isinstance(r, SessionExpired | InvalidRequest):
                return True
        elif r.kind is VoteKind.NO:
            return True
    return False


class Coordinator:
    """Runs commits over a set of shards reached through ShardService."""

    def __init__(self, shards: Mapping[int, ShardService], shard_for: Callable[[str], int], *,
                 clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.shards = shards
        self.shard_for = shard_for
        # Read leases (PROTOCOL.md §5.8): a deadline is this wall clock when the validations
        # were sent plus the lease; a commit that writes nothing measures on the monotonic one.
        self.clock = clock
        self.monotonic = monotonic
        self._background: set[asyncio.Task] = set()
        # leases to end, by shard, until the task sending them (_send_lease_releases) runs
        self._lease_releases: dict[int, list[str]] = {}
        self.metrics = CommitMetrics()  # what this coordinator counts, once (/metrics and stats)

    @property
    def counters(self) -> dict[str, int]:
        """commits_1pc, commits_2pc, conflicts, aborts_2pc: read from ``metrics``."""
        return self.metrics.stats()

    def _refused(self, refusal: OribusError) -> OribusError:
        """Count a refused commit (and, on /metrics, each distinct reason a Conflict names)."""
        self.metrics.refused([s.reason for s in refusal.stale] if isinstance(refusal, Conflict) else [])
        return refusal

    def _shard(self, shard_id: int) -> ShardService:
        try:
            return self.shards[shard_id]
        except KeyError:
            raise Unavailable(f"no shard {shard_id} is known to this bus", shard=shard_id) from None

    def split(self, req: CommitRequest) -> dict[int, ShardTxn]:
        """One ShardTxn per participant shard."""
        # Tokens and seqs come from the client: one naming a shard this bus does not have
        # is a malformed request (not Unavailable, which would invite endless retries).
        unknown = {*req.tokens, *req.since} - self.shards.keys()
        if unknown:
            raise InvalidRequest(
                f"the request names shards this bus does not have: {sorted(unknown)}",
                shards=sorted(unknown),
            )
        parts: dict[int, ShardTxn] = {}

        def part(shard_id: int) -> ShardTxn:
            st = parts.get(shard_id)
            if st is None:
                st = parts[shard_id] = ShardTxn(
                    txn_id=req.commit_id,
                    session=req.session,
                    scope=req.scope,
                    strict=req.strict,
                    committed_at=req.committed_at,
                    token=req.tokens.get(shard_id),
                    since_seq=req.since.get(shard_id) if req.scope is Scope.TRANSACTION else None,
                )
            return st

        shard_for = self.shard_for
        for k, value in req.writes.items():
            part(shard_for(k)).writes[k] = value
        for k, version in req.rollback.items():
            part(shard_for(k)).rollback[k] = version
        for k, version in req.expect.items():
            part(shard_for(k)).expect[k] = version
        for k, version in req.read_set.items():
            part(shard_for(k)).read_set[k] = version
        # shards where the session's read set lives, even when nothing is written there
        if req.scope is Scope.SESSION:
            for shard_id in req.tokens:
                part(shard_id)
            if req.broadcast:
                for shard_id in self.shards:
                    part(shard_id)
        else:
            for shard_id in req.since:
                part(shard_id)
        written = sorted([*req.writes, *req.rollback])
        primary = shard_for(written[0]) if written else min(parts) if parts else 0
        # what a writer records and recovery finishes: the writers (every participant when
        # there is only one); read-only participants keep no record (PROTOCOL.md §5.8)
        writers = tuple(sorted(s for s, st in parts.items() if st.written_keys))
        participants = writers if len(parts) > 1 else tuple(parts)
        for st in parts.values():
            st.participants = participants
            st.primary = primary
        return parts

    async def commit(self, req: CommitRequest) -> CommitResult:
        parts = self.split(req)
        if not parts:
            return CommitResult(req.commit_id, {}, {}, False)
        if len(parts) == 1:
            (shard_id, st), = parts.items()
            tracing.annotate(shards=[shard_id], commit_path="1pc")
            out = await self._shard(shard_id).commit_one_phase(st)
            if out.state is not TxnState.COMMITTED:
                raise self._refused(conflict_from(out.stale, req.commit_id))
            self.metrics.commits_1pc.inc()
            return CommitResult(req.commit_id, out.versions, {shard_id: out.token} if out.token else {}, False)
        writers = [s for s, st in parts.items() if st.written_keys]
        readers = [s for s in parts if s not in writers]
        if not writers:
            tracing.annotate(shards=sorted(parts), commit_path="read-only")
            return await self._read_only(req.commit_id, parts)
        if len(writers) == 1 and readers:
            tracing.annotate(shards=sorted(parts), commit_path="one-writer")
            return await self._one_writer(req.commit_id, parts, writers[0], readers)
        tracing.annotate(shards=sorted(parts), commit_path="2pc")
        return await self._two_phase(req.commit_id, parts, writers, readers)

    # ---- read-only participants (PROTOCOL.md §5.8) -------------------------------------

    async def _validate(self, parts: dict[int, ShardTxn], readers: list[int]) -> list:
        return await asyncio.gather(*(self._shard(s).validate(parts[s]) for s in readers),
                                    return_exceptions=True)

    def _release_leases(self, commit_id: str, readers: list[int], votes: list) -> None:
        """The outcome is known: end the leases granted, off the client's critical path (a lost
        release only leaves a lease to run out). The releases of one loop turn leave together,
        one ``release_leases`` call per shard (the commits that one reply frame wakes finish in
        the same turn): the first of a turn starts the task that sends them, which takes the
        list when it runs, in the next turn."""
        pending = self._lease_releases
        for s, v in zip(readers, votes, strict=True):
            if isinstance(v, Vote) and v.lease:
                ids = pending.get(s)
                if ids is not None:
                    ids.append(commit_id)
                    continue
                pending[s] = [commit_id]
                task = asyncio.get_running_loop().create_task(self._send_lease_releases(s))
                self._background.add(task)
                task.add_done_callback(self._background.discard)

    async def _send_lease_releases(self, shard_id: int) -> None:
        commit_ids = self._lease_releases.pop(shard_id)
        try:
            await self._shard(shard_id).release_leases(commit_ids)
        except OribusError as e:
            log.debug("release of %d lease(s) on shard %d failed (they run out): %s", len(commit_ids), shard_id, e)

    @staticmethod
    def _deadline(sent: float, votes: list) -> float | None:
        leases = [v.lease for v in votes if isinstance(v, Vote) and v.lease]
        return sent + min(leases) if leases else None

    @staticmethod
    def _refusal(votes: list, commit_id: str) -> tuple[OribusError | None, bool]:
        """What the read-only participants' answers refuse: (the error to answer, whether the
        refusal is for good). None: every one validated. For good: a NO, SessionExpired or
        InvalidRequest (reported in that order of precedence: SessionExpired, InvalidRequest,
        Conflict); otherwise the strongest other error, Unavailable typically, is not."""
        error = _strongest_error(votes)
        if error is not None and not isinstance(error, OribusError):
            raise error
        if isinstance(error, SessionExpired | InvalidRequest):
            return error, True
        if any(isinstance(v, Vote) and v.kind is VoteKind.NO for v in votes):
            stale = [s for v in votes if isinstance(v, Vote) for s in v.stale]
            return conflict_from(stale, commit_id), True
        assert error is None or isinstance(error, OribusError)
        return error, False

    async def _one_writer(self, commit_id: str, parts: dict[int, ShardTxn], writer: int,
                          readers: list[int]) -> CommitResult:
        """Validate the read-only participants, then one phase on the writer before the deadline."""
        sent = self.clock()
        votes = await self._validate(parts, readers)
        refusal, for_good = self._refusal(votes, commit_id)
        st = parts[writer]
        if refusal is not None:
            if not for_good:
                # nothing refused for good: the outcome of this id is whatever an earlier attempt
                # made it; leases (if any) run out, the client retries with the same id
                raise refusal
            # Refused for good: the writer must not commit this id later (a copy of an earlier
            # attempt in flight), and may already have (a retry): ask it before answering. Its
            # own refusal joins the answer, which names every offending key of every participant.
            writer_said: TxnOutcome | OribusError
            try:
                writer_said = await self._shard(writer).withdraw(st)
            except (SessionExpired, InvalidRequest) as e:
                writer_said = e
            self._release_leases(commit_id, readers, votes)
            if isinstance(writer_said, TxnOutcome):
                if writer_said.state is TxnState.COMMITTED:
                    return self._one_phase_result(commit_id, writer, writer_said)
                votes_and_writer = [*votes, Vote(VoteKind.NO, stale=writer_said.stale)]
            else:
                votes_and_writer = [*votes, writer_said]
            refusal, _ = self._refusal(votes_and_writer, commit_id)
            assert refusal is not None  # a read-only participant refused for good
            if isinstance(refusal, Conflict):
                raise self._refused(refusal)
            raise refusal
        st.deadline = self._deadline(sent, votes)
        try:
            out = await self._shard(writer).commit_one_phase(st)  # Unavailable: outcome unknown, keep the leases
        except (SessionExpired, InvalidRequest):
            self._release_leases(commit_id, readers, votes)  # refused for good (and tombstoned)
            raise
        self._release_leases(commit_id, readers, votes)
        if out.state is not TxnState.COMMITTED:
            if out.reason == LEASE_EXPIRED:
                raise self._refused(_lease_expired(commit_id, st.deadline or 0.0))
            raise self._refused(conflict_from(out.stale, commit_id))
        return self._one_phase_result(commit_id, writer, out)

    def _one_phase_result(self, commit_id: str, writer: int, out: TxnOutcome) -> CommitResult:
        self.metrics.commits_1pc.inc()
        return CommitResult(commit_id, out.versions, {writer: out.token} if out.token else {}, False)

    async def _read_only(self, commit_id: str, parts: dict[int, ShardTxn]) -> CommitResult:
        """A commit that writes nothing on several shards: validate everywhere; its commit point is
        the arrival of the last vote, which must come within the shortest lease (§5.8)."""
        readers = list(parts)
        started = self.monotonic()
        votes = await self._validate(parts, readers)
        arrived = self.monotonic()
        refusal, for_good = self._refusal(votes, commit_id)
        if refusal is not None and not for_good:
            raise refusal  # no record anywhere: nothing to settle; leases run out
        self._release_leases(commit_id, readers, votes)
        if refusal is not None:
            raise self._refused(refusal) if isinstance(refusal, Conflict) else refusal
        leases = [v.lease for v in votes if v.lease]
        if leases and arrived - started > min(leases):
            raise self._refused(_lease_expired(commit_id, self.clock()))
        self.metrics.commits_1pc.inc()
        return CommitResult(commit_id, {}, {}, False)

    # ---- two phases among the writers --------------------------------------------------

    async def _two_phase(self, commit_id: str, parts: dict[int, ShardTxn], writers: list[int],
                         readers: list[int]) -> CommitResult:
        primary = next(iter(parts.values())).primary
        ids = writers
        sent = self.clock()
        answers = await asyncio.gather(
            *(self._shard(s).prepare(parts[s]) for s in ids),
            *(self._shard(s).validate(parts[s]) for s in readers),
            return_exceptions=True,
        )
        results, votes = answers[:len(ids)], answers[len(ids):]
        stale: list[Stale] = []
        refused = False
        skip = {s for s, r in zip(ids, results, strict=True)
                if not isinstance(r, BaseException) and r.kind is VoteKind.NOTHING}
        # a refusal that is not a conflict wins: SessionExpired, then InvalidRequest, then the rest
        error = _strongest_error(answers)
        for r in answers:
            if not isinstance(r, BaseException) and r.kind is VoteKind.NO:
                refused = True
                stale.extend(r.stale)
        if error is not None and not isinstance(error, OribusError):
            raise error
        deadline = self._deadline(sent, votes)
        # Any NO vote aborts, even one naming no key: a participant holding an ABORTED
        # tombstone for this commit id (an earlier attempt was aborted there) votes NO with
        # nothing stale. Deciding on ``stale`` alone let a retry of that id commit at the
        # primary while the tombstoned participant never applied its part (a partial
        # commit, found by the deterministic simulation, tests/consistency/test_simulation.py).
        commit = error is None and not refused
        try:
            decision = await self._shard(primary).decide(commit_id, commit, deadline if commit else None)
        except OribusError as e:
            # Without the primary's record the outcome is known only if the votes prove the
            # id never committed; otherwise the participants must stay prepared (recovery
            # resolves them through the primary) — aborting them could undo a commit an
            # earlier attempt of this id made at the primary: a partial commit.
            if commit or not _never_committed(results):
                raise Unavailable(
                    f"the outcome of transaction {commit_id} is unknown (primary shard {primary}: {e}); "
                    "retry with the same commit id",
                    commit_id=commit_id,
                ) from e
            decision = TxnOutcome(TxnState.ABORTED)
        committed = decision.state is TxnState.COMMITTED
        self._release_leases(commit_id, readers, votes)  # the outcome is known
        others = [s for s in ids if s != primary and s not in skip]
        finished = await asyncio.gather(
            *(self._shard(s).finish(commit_id, committed) for s in others), return_exceptions=True
        )
        if not committed:
            self.metrics.aborts_2pc.inc()
            if error is not None:
                raise error
            if decision.reason == LEASE_EXPIRED and deadline is not None:
                raise self._refused(_lease_expired(commit_id, deadline))
            raise self._refused(conflict_from(stale, commit_id))
        # Every participant's new versions are known from its YES (or COMMITTED) vote: its
        # write intents fixed them at prepare time, so a participant that dies before
        # answering its finish still has them reported (PROTOCOL.md §5.3).
        versions: dict[str, int] = {}
        for r in results:
            if not isinstance(r, BaseException):
                versions.update(r.versions)
        versions.update(decision.versions)
        tokens: dict[int, Token] = {}
        if decision.token and decision.versions:
            tokens[primary] = decision.token
        settled = True
        for s, f in zip(others, finished, strict=True):
            if isinstance(f, BaseException):
                settled = False
                log.warning("finish of %s on shard %d failed (recovery will resolve it): %s", commit_id, s, f)
                continue
            versions.update(f.versions)
            if f.token and f.versions:
                tokens[s] = f.token
        unreported = sorted(shard_id for shard_id, st in parts.items()
                            if any(k not in versions for k in st.written_keys))
        if unreported:
            # A retried commit id whose earlier attempt committed, with a participant that
            # answered neither its prepare nor its finish: the commit stands, but an answer
            # must name the new version of every written key, so it waits for a retry that
            # reaches that participant (PROTOCOL.md §5.7).
            raise Unavailable(
                f"transaction {commit_id} is committed, but shard(s) {unreported} did not "
                "report its new versions; retry with the same commit id",
                commit_id=commit_id, shards=unreported,
            )
        if settled:
            # every participant applied it: the primary may forget the decision (off the
            # client's critical path; if it is lost, the recovery sweep releases it)
            task = asyncio.get_running_loop().create_task(self._release(primary, commit_id))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        self.metrics.commits_2pc.inc()
        return CommitResult(commit_id, versions, tokens, True)

    async def _release(self, primary: int, commit_id: str) -> None:
        try:
            await self._shard(primary).release(commit_id)
        except OribusError as e:
            log.info("release of %s on shard %d deferred: %s", commit_id, primary, e)

    async def recover(self, shard_id: int, txn: TxnRef) -> TxnState:
        """Resolve a prepared transaction found on ``shard_id`` through its primary."""
        primary = self._shard(txn.primary)
        status = await primary.status(txn.txn_id)
        state: TxnState
        if status.state in (TxnState.COMMITTED, TxnState.ABORTED):
            state = status.state
        else:
            # no outcome at the primary: abort there (its tombstone forbids a late commit)
            state = (await primary.decide(txn.txn_id, False)).state
        committed = state is TxnState.COMMITTED
        # finish it everywhere at once (not only where it was found)
        others = [s for s in (txn.participants or (shard_id,)) if s != txn.primary]
        if shard_id not in others and shard_id != txn.primary:
            others.append(shard_id)
        results = await asyncio.gather(
            *(self._shard(s).finish(txn.txn_id, committed) for s in others), return_exceptions=True
        )
        if committed and not any(isinstance(r, BaseException) for r in results):
            await primary.release(txn.txn_id)
        log.info("recovered transaction %s on shard %d: %s", txn.txn_id, shard_id, state.value)
        return state

    async def release_settled(self, primary_id: int, txn: TxnRef) -> bool:
        """Release a kept decision once no participant still has the transaction prepared."""
        statuses = await asyncio.gather(
            *(self._shard(s).status(txn.txn_id) for s in txn.participants if s != primary_id),
            return_exceptions=True,
        )
        for st in statuses:
            if isinstance(st, BaseException) or st.state is TxnState.PREPARED:
                return False
        await self._shard(primary_id).release(txn.txn_id)
        return True
