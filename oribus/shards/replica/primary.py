"""The primary's side of a replica group: ``ReplicatedWal`` (``specs/replication.md`` §3, §4, §6).

``ReplicatedWal`` is the WAL a replicated primary's ``Shard`` runs on. It wraps the member's
own ``Wal`` and keeps its API (``ShardWal``), with one change that makes every durability
point of ``specs/PROTOCOL.md`` a quorum point: ``when_durable(lsn, callback)`` and
``sync(lsn)`` — the funnel every commit, prepare and decision goes through — return once
``lsn`` is at or below the **commit index**, not once it is fsynced here.

Commit index
    The highest LSN fsynced on a majority of the group's voters (``replicas // 2 + 1`` of
    them, the primary counting itself at its local ``durable_lsn``, each follower at the
    ``durable_lsn`` of its last accepted batch, learners not at all), once that LSN is at or
    above this term's ``TERM_START``: a record of an older term is never counted committed by
    its copies, only by a record of this term after it (§5 step 5). It never goes down.

Shipping
    The local ``Wal`` hands every group-commit batch to ``on_batch`` as its flush takes it
    (before its own fsync, which runs meanwhile). The batches are kept in memory (up to
    ``recent_bytes``); older frames are read back from the segment files. Each follower has
    one task and one batch in flight: it sends everything the follower lacks from its next
    LSN (up to ``max_batch_bytes``) as one ``AppendBatch``, so under load a round trip carries
    all that arrived meanwhile, as one fsync does. Every batch carries ``commit_lsn``; with
    nothing to send it sends an empty batch (a heartbeat) every ``heartbeat_seconds``, so a
    follower learns the commit index with the next batch or within a heartbeat (it needs it
    only to apply, never to acknowledge). ``Unavailable`` (or any connection error) is retried after a
    backoff doubling from ``retry_min_seconds`` to ``retry_max_seconds``; a refusal for a log
    mismatch moves the follower's next LSN back (to just after its last record, or to the
    start of the primary's term at the refused position) and resends; a follower that needs
    records below the log's first LSN gets the latest snapshot (``snapshot_source``) in
    ``SnapshotChunk`` s, then the log after it. A slow or dead follower delays only its own
    task: commits need a majority, not everyone.

Deposition
    A reply naming a higher term (or ``depose(term)``, which the member calls when it promises
    a higher term) deposes the primary for good: every waiter fails with ``Unavailable``,
    ``append``, ``sync`` and ``when_durable`` raise it from then on, the followers' tasks
    stop, and ``on_deposed(term)`` is called once. A deposed primary never acknowledges.

Metrics (``oribus.metrics``, with a ``metrics_label``: the shard id): every durability wait
observes ``oribus_replica_quorum_wait_seconds{shard}`` when its record is committed, each
accepted batch sets ``oribus_replica_lag_records{shard,member}``; the member counts
``oribus_replica_takeovers_total{shard}`` when it begins serving a term.

Usage (``ReplicaMember.become_primary`` does this)::

    rw = ReplicatedWal(wal, terms, term=t, member_id=me, replicas=3, peers=peers,
                       snapshot_source=source, on_deposed=deposed)
    rw.start()                      # the followers' tasks
    lsn = rw.begin_term()           # TERM_START of term t
    await rw.sync(lsn)              # committed on a majority: the shard may recover and serve
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import heapq
import itertools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from oribus.errors import Unavailable
from oribus.metrics import REPLICA_LAG_RECORDS, REPLICA_QUORUM_SECONDS
from oribus.shards.replica.catchup import CatchupData
from oribus.shards.replica.messages import AppendBatch, AppendReply, Peer, SnapshotChunk
from oribus.shards.replica.rules import commit_index, quorum_lsn, resend_from
from oribus.shards.replica.terms import Terms
from oribus.shards.wal import Wal
from oribus.shards.wal.record import TERM_START
from oribus.shards.wal.writer import DurableCallback, FrameCursor, _settle

log = logging.getLogger("oribus.replica")

# What a failed call to a follower may raise: retried after a backoff.
PEER_ERRORS = (Unavailable, OSError, ConnectionError, asyncio.TimeoutError, EOFError)


@dataclass
class ReplicationOptions:
    """Timing and sizes of log shipping (defaults suit a LAN)."""

    heartbeat_seconds: float = 0.05  # an idle follower gets an empty batch this often
    retry_min_seconds: float = 0.01  # backoff after a failed call, doubling ...
    retry_max_seconds: float = 1.0  # ... up to this
    max_batch_bytes: int = 4 << 20  # frames per AppendBatch (at least one frame)
    recent_bytes: int = 32 << 20  # batches kept in memory for shipping; older ones are read back
    snapshot_chunk_bytes: int = 1 << 20
    # BROKEN on purpose, for testing the tests (the simulation must catch it): a record counts
    # as committed once it is fsynced here, whatever the followers hold.
    unsafe_ack_on_local_fsync: bool = False


@dataclass(eq=False)
class Follower:
    """What the primary knows of one other member."""

    peer: Peer
    next_lsn: int  # the next record to send it
    match_lsn: int = 0  # every record up to here is fsynced there and agrees with this log
    voter: bool = False  # counted once a reply says so
    sent_commit: int = -1  # the commit index the last accepted batch carried
    failures: int = 0  # calls failed in a row
    acked_at: float | None = None  # time.monotonic() of its last accepted batch or snapshot (None: none yet)
    snapshots_sent: int = 0
    cursor: FrameCursor | None = None  # where reading its frames back from disk continues
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task | None = None

    @property
    def member_id(self) -> int:
        return self.peer.member_id


class ReplicatedWal:
    """The WAL of a replica group's primary (module docstring); a ``ShardWal``."""

    replicated = True

    def __init__(self, wal: Wal, terms: Terms, *, term: int, member_id: int, replicas: int,
                 peers: Sequence[Peer], snapshot_source: Callable[[], tuple[int, CatchupData] | None] | None = None,
                 on_deposed: Callable[[int], None] | None = None,
                 options: ReplicationOptions | None = None, metrics_label: str = "") -> None:
        if replicas < 1:
            raise ValueError(f"a group has at least one member, not {replicas}")
        self.wal = wal
        self.terms = terms
        self.term = term
        self.member_id = member_id
        self.replicas = replicas
        self.majority = replicas // 2 + 1
        self.options = options or ReplicationOptions()
        self.snapshot_source = snapshot_source
        self.on_deposed = on_deposed
        self.followers = [Follower(p, wal.last_lsn + 1) for p in peers if p.member_id != member_id]
        self.term_start_lsn: int | None = None  # this term's TERM_START (commits count from it)
        self._commit_lsn = 0
        self._waiters: list[tuple[int, int, float, DurableCallback]] = []  # heap by LSN; perf_counter at wait
        self.metrics_label = metrics_label
        self._quorum_seconds = REPLICA_QUORUM_SECONDS.labels(shard=metrics_label) if metrics_label else None
        self._lag = {f.member_id: REPLICA_LAG_RECORDS.labels(shard=metrics_label, member=str(f.member_id))
                     for f in self.followers} if metrics_label else {}
        self._seq = itertools.count()
        self._recent: collections.deque[tuple[int, list[bytes]]] = collections.deque()
        self._recent_bytes = 0
        self._available_lsn = wal.last_lsn  # frames up to here may be shipped
        self._deposed: int | None = None
        self._failed: BaseException | None = None
        self._stopped = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self.counters = {"batches_sent": 0, "heartbeats": 0, "refusals": 0, "peer_errors": 0,
                         "snapshots_sent": 0}

    # ---- lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        """Hook into the local WAL's batches and start one task per follower."""
        self._loop = asyncio.get_running_loop()
        self.wal.on_batch = self._on_batch
        for f in self.followers:
            f.task = self._loop.create_task(self._follow(f), name=f"replicate to member {f.member_id}")

    def begin_term(self) -> int:
        """Append this term's ``TERM_START`` record; returns its LSN (wait with ``sync``)."""
        lsn = self.append(TERM_START, {"t": self.term, "m": self.member_id})
        self.terms.start(self.term, lsn)
        self.term_start_lsn = lsn
        return lsn

    async def stop(self) -> None:
        """Stop shipping and fail every waiter (``Unavailable``); the local WAL stays open."""
        self._stop_tasks()
        self._fail_waiters(Unavailable(f"the primary of term {self.term} stopped"))
        tasks = [f.task for f in self.followers if f.task is not None]
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task

    async def close(self) -> None:
        """``stop``, then close the local WAL (flushing what is buffered)."""
        await self.stop()
        await self.wal.close()

    def depose(self, term: int) -> None:
        """A higher term exists: never acknowledge again (module docstring, "Deposition")."""
        if self._deposed is not None or term <= self.term:
            return
        self._deposed = term
        log.warning("member %d: primary of term %d deposed by term %d", self.member_id, self.term, term)
        self._stop_tasks()
        self._fail_waiters(self._deposed_error())
        if self.on_deposed is not None:
            try:
                self.on_deposed(term)
            except Exception:
                log.exception("the on_deposed callback failed")

    @property
    def deposed(self) -> int | None:
        """The higher term that deposed this primary (None: not deposed)."""
        return self._deposed

    # ---- the ShardWal API ---------------------------------------------------------

    @property
    def on_new_segment(self) -> Callable[[int], None] | None:
        return self.wal.on_new_segment

    @on_new_segment.setter
    def on_new_segment(self, callback: Callable[[int], None] | None) -> None:
        self.wal.on_new_segment = callback

    @property
    def last_lsn(self) -> int:
        return self.wal.last_lsn

    @property
    def durable_lsn(self) -> int:
        """Fsynced here (the MANIFEST's mark is about this disk); ``commit_lsn`` is the group's."""
        return self.wal.durable_lsn

    @property
    def commit_lsn(self) -> int:
        """The commit index (module docstring): never goes down."""
        return self._commit_lsn

    @property
    def stats(self) -> dict[str, Any]:
        return {**self.wal.stats, "term": self.term, "commit_lsn": self._commit_lsn,
                "followers": {f.member_id: {"match_lsn": f.match_lsn, "next_lsn": f.next_lsn,
                                            "voter": f.voter, "lag": self.wal.last_lsn - f.match_lsn,
                                            "failures": f.failures} for f in self.followers},
                **self.counters}

    def append(self, rtype: int, body: Any) -> int:
        self._check_usable()
        return self.wal.append(rtype, body)

    def when_durable(self, lsn: int, callback: DurableCallback) -> None:
        """Call ``callback(None)`` once ``lsn`` is committed (at or below the commit index), or
        ``callback(error)`` once it cannot be acknowledged here (failed WAL, deposed, stopped)."""
        self._check_usable()
        self.wal.when_durable(lsn, self._local_durable)  # starts the flush; raises as Wal does
        heapq.heappush(self._waiters, (lsn, next(self._seq), time.perf_counter(), callback))
        if lsn <= self._commit_lsn:
            self._call_waiters()

    async def sync(self, lsn: int | None = None) -> None:
        self._check_usable()
        target = self.wal.last_lsn if lsn is None else lsn
        if target > self.wal.last_lsn:
            raise ValueError(f"cannot sync LSN {target}: last appended LSN is {self.wal.last_lsn}")
        if target <= self._commit_lsn:
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.when_durable(target, lambda error: _settle(done, error))
        await done

    def roll(self) -> None:
        self.wal.roll()

    def remove_segments_before(self, lsn: int) -> int:
        return self.wal.remove_segments_before(lsn)

    # ---- commit index -------------------------------------------------------------

    def quorum_lsn(self) -> int:
        """The highest LSN fsynced on a majority of the voters (this member included)."""
        if self.options.unsafe_ack_on_local_fsync:
            return self.wal.durable_lsn
        return quorum_lsn(self.wal.durable_lsn, [f.match_lsn for f in self.followers if f.voter], self.replicas)

    def _advance(self) -> None:
        if self._deposed is not None or self._failed is not None:
            return
        commit = commit_index(self._commit_lsn, self.quorum_lsn(), self.term_start_lsn)
        if commit > self._commit_lsn:
            self._commit_lsn = commit
            self._call_waiters()

    def _call_waiters(self) -> None:
        waiters = self._waiters
        histogram = self._quorum_seconds
        now = time.perf_counter() if histogram is not None else 0.0
        while waiters and waiters[0][0] <= self._commit_lsn:
            _, _, started, callback = heapq.heappop(waiters)
            if histogram is not None:
                histogram.observe(now - started)
            try:
                callback(None)
            except Exception:
                log.exception("a replicated durability callback failed")

    def _local_durable(self, error: BaseException | None) -> None:
        if error is not None:
            self._failed = error
            self._fail_waiters(error)
        else:
            self._advance()

    def _fail_waiters(self, error: BaseException) -> None:
        waiters, self._waiters = self._waiters, []
        for *_, callback in sorted(waiters, key=lambda w: (w[0], w[1])):
            try:
                callback(error)
            except Exception:
                log.exception("a replicated durability callback failed")

    def _deposed_error(self) -> Unavailable:
        return Unavailable(f"member {self.member_id} is no longer the primary: term {self._deposed} "
                           f"replaced its term {self.term}", term=self.term, deposed_by=self._deposed)

    def _check_usable(self) -> None:
        if self._deposed is not None:
            raise self._deposed_error()
        if self._failed is not None:
            raise self._failed if isinstance(self._failed, Unavailable) else Unavailable(str(self._failed))
        if self._stopped:
            raise Unavailable(f"the primary of term {self.term} stopped")

    # ---- shipping -------------------------------------------------------------------

    def _on_batch(self, first_lsn: int, frames: list[bytes]) -> None:
        """The local WAL's flush took a batch (flush thread): ship it."""
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody ships any more
                loop.call_soon_threadsafe(self._batch_arrived, first_lsn, frames)

    def _batch_arrived(self, first_lsn: int, frames: list[bytes]) -> None:
        self._recent.append((first_lsn, frames))
        self._recent_bytes += sum(map(len, frames))
        while len(self._recent) > 1 and self._recent_bytes > self.options.recent_bytes:
            _, old = self._recent.popleft()
            self._recent_bytes -= sum(map(len, old))
        self._available_lsn = max(self._available_lsn, first_lsn + len(frames) - 1)
        for f in self.followers:
            f.wake.set()

    async def _frames(self, f: Follower) -> tuple[bytes, int]:
        """Frames from the follower's next LSN on (up to ``max_batch_bytes``), and the last LSN
        included: from the batches in memory, or else read back from the segment files."""
        next_lsn = f.next_lsn
        if next_lsn > self._available_lsn:
            return b"", next_lsn - 1
        limit = self.options.max_batch_bytes
        if self._recent and next_lsn >= self._recent[0][0]:
            parts: list[bytes] = []
            size = 0
            last = next_lsn - 1
            for first, frames in self._recent:
                if first + len(frames) <= next_lsn:
                    continue
                for frame in frames[max(0, last + 1 - first):]:
                    if size and size + len(frame) > limit:
                        return b"".join(parts), last
                    parts.append(frame)
                    size += len(frame)
                    last += 1
            return b"".join(parts), last
        loop = asyncio.get_running_loop()
        read = await loop.run_in_executor(None, self.wal.read_frames, next_lsn, limit, self._available_lsn,
                                          f.cursor)
        f.cursor = read.cursor
        return read.data, read.last_lsn

    def _stop_tasks(self) -> None:
        self._stopped = True
        if self.wal.on_batch == self._on_batch:
            self.wal.on_batch = None
        current = asyncio.current_task() if self._loop is not None else None
        for f in self.followers:
            if f.task is not None and f.task is not current:
                f.task.cancel()
            f.wake.set()

    async def _follow(self, f: Follower) -> None:
        backoff = self.options.retry_min_seconds
        while not self._stopped:
            try:
                if f.next_lsn < self.wal.first_lsn:
                    await self._send_snapshot(f)
                else:
                    await self._send_batch(f)
                f.failures = 0
                backoff = self.options.retry_min_seconds
            except PEER_ERRORS as e:
                if self._stopped:
                    return
                f.failures += 1
                self.counters["peer_errors"] += 1
                if f.failures in (1, 10, 100) or f.failures % 1000 == 0:
                    log.info("member %d: member %d unreachable (%d failed calls): %s", self.member_id,
                             f.member_id, f.failures, e)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.options.retry_max_seconds)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("member %d: shipping to member %d failed", self.member_id, f.member_id)
                await asyncio.sleep(self.options.retry_max_seconds)

    async def _send_batch(self, f: Follower) -> None:
        if f.next_lsn > self._available_lsn:  # nothing to send: the next batch, or a heartbeat
            f.wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(f.wake.wait(), self.options.heartbeat_seconds)
            if self._stopped or f.next_lsn < self.wal.first_lsn:
                return
        frames, last = await self._frames(f)
        prev = f.next_lsn - 1
        batch = AppendBatch(term=self.term, primary=self.member_id, prev=(self.terms.term_at(prev), prev),
                            frames=frames, last_lsn=last, commit_lsn=self._commit_lsn)
        self.counters["batches_sent" if frames else "heartbeats"] += 1
        reply = await f.peer.append(batch)
        if self._stopped:
            return
        self._on_reply(f, batch.prev[0], prev, last, batch.commit_lsn, reply)

    def _on_reply(self, f: Follower, prev_term: int, prev: int, last: int, commit: int,
                  reply: AppendReply) -> None:
        if reply.term > self.term:
            self.depose(reply.term)
            return
        f.voter = getattr(reply, "voter", True)
        if reply.ok:
            f.acked_at = time.monotonic()
            f.match_lsn = max(f.match_lsn, min(reply.durable_lsn, last))
            gauge = self._lag.get(f.member_id)
            if gauge is not None:
                gauge.set(self.wal.last_lsn - f.match_lsn)
            f.next_lsn = max(f.next_lsn, last + 1)
            f.sent_commit = max(f.sent_commit, commit)
            self._advance()
            return
        self.counters["refusals"] += 1
        if reply.needs_snapshot:
            f.next_lsn = 0
            return
        f.next_lsn = resend_from(self.terms, (prev_term, prev), reply.last[1], f.next_lsn)

    async def _send_snapshot(self, f: Follower) -> None:
        loop = asyncio.get_running_loop()
        snap = await loop.run_in_executor(None, self.snapshot_source) if self.snapshot_source else None
        if snap is None or snap[0] + 1 < self.wal.first_lsn:
            raise Unavailable(f"member {f.member_id} needs records before LSN {self.wal.first_lsn} "
                              "and there is no snapshot that reaches them")
        lsn, data = snap
        try:
            await self._send_snapshot_data(f, lsn, data)
        finally:
            close = getattr(data, "close", None)  # a CatchupSource's temporary file
            if close is not None:
                close()

    async def _send_snapshot_data(self, f: Follower, lsn: int, data: CatchupData) -> None:
        step = self.options.snapshot_chunk_bytes
        offset = 0
        while True:
            piece = data[offset:offset + step]
            done = offset + len(piece) >= len(data)
            reply = await f.peer.install_snapshot(SnapshotChunk(
                term=self.term, primary=self.member_id, lsn=lsn, last_term=self.terms.term_at(lsn),
                offset=offset, data=piece, done=done))
            if self._stopped:
                return
            if reply.term > self.term:
                self.depose(reply.term)
                return
            if not reply.ok:
                raise Unavailable(f"member {f.member_id} refused the snapshot at LSN {lsn}")
            offset += len(piece)
            if done:
                break
        f.voter = getattr(reply, "voter", f.voter)
        f.next_lsn = lsn + 1
        f.match_lsn = max(f.match_lsn, min(reply.durable_lsn, lsn))
        f.snapshots_sent += 1
        f.acked_at = time.monotonic()
        self.counters["snapshots_sent"] += 1
        log.info("member %d: sent member %d the snapshot at LSN %d", self.member_id, f.member_id, lsn)
        self._advance()
