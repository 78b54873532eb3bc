"""The delivery log of one shard: which version of which key each session was given.

A shard records a *delivery* ("key k at version v was returned to session s")
at the moment it builds a read response. At commit time the log rebuilds the
session's read set from those deliveries, so a plain client that never sends
a read set is still checked (specs/engine.md, "The commit rule (ORI)"). This module
is sans-IO: no sockets, no tasks, no sleeps; time comes from an injected
clock, so tests and the simulator drive it deterministically.

Per session the log keeps one record::

    _SessionRecord
      incarnation   int    unique within this log; new each time the record is created
      seq           int    the last sequence number given to a delivery (0: none yet)
      last_active   float  clock reading of the last access (TTL bookkeeping)
      entries       dict   key -> packed entry (below)

Each entry is ONE int packing the delivered version and the sequence number
of that delivery::

    entry = version << SEQ_BITS | seq

     most significant                                  least significant
    +-----------------------------------------+------------------------+
    | version (any non-negative int)          | seq (SEQ_BITS = 40)    |
    +-----------------------------------------+------------------------+

Python ints are unbounded, so a version never overflows: a larger version
only makes the int a few bytes bigger. The sequence number is capped at
``MAX_SEQ`` (2**40 - 1, about 10**12 deliveries to one session); beyond it
``record`` raises LimitExceeded rather than wrap, so no entry is ever
silently misread.

Why one packed int: measured with tracemalloc at 1,000,000 entries
(``benchmarks/delivery_log_memory.py``, CPython 3.11, keys held by the
store), a ``{key: packed}`` dict costs 53-65 bytes per entry, two parallel
dicts ``{key: version}`` and ``{key: seq}`` 98-99, and
``{key: (version, seq)}`` tuples 120-134. The whole log, session records
included, measured 53 bytes per entry at 100 sessions x 10,000 keys and 68
at 10,000 sessions x 100 keys (RSS growth agrees within 1 byte).

Keys are stored by reference. Callers should pass the store's canonical key
object (the very ``str`` the store holds as its dict key) so the log shares
it instead of keeping its own copy; the log does not validate keys, the
store already has.

Scopes (specs/PROTOCOL.md, "Sessions: scopes and failing closed"):
``read_set(session)`` is the *session* scope, every
delivery still logged; ``read_set(session, since_seq=s)`` is the
*transaction* scope, only deliveries with ``seq >= s``. Sequence numbers
never go backwards within an incarnation (``reset`` and ``forget`` keep the
counter), so a transaction that began at ``s`` never mistakes an older read
for one of its own, and never misses a newer one.

Fail closed: a commit presents the incarnation its session was given by this
shard. If the record has expired (TTL), was dropped, or belongs to a
different incarnation, ``read_set`` raises SessionExpired instead of
validating against less than the session read.

Bounded memory, never silent loss: a new key beyond
``max_entries_per_session`` raises LimitExceeded and changes nothing. A new
session beyond ``max_sessions`` first expires idle ones, then *evicts* the
least recently active record: its incarnation is gone, so that session's next
commit fails closed with SessionExpired exactly as after a TTL expiry. (Refusing
new sessions instead would let one client that opens enough sessions lock every
other agent out until the TTL runs out.) Sessions are kept in an OrderedDict
ordered by last activity, so the TTL sweep and eviction only look at the front.

The log is not thread-safe; a shard drives it from one event loop.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable

from oribus.delivery_log.config import DeliveryLogConfig
from oribus.errors import InvalidRequest, LimitExceeded, SessionExpired
from oribus.types import SessionRef

SEQ_BITS = 40  # low bits of a packed entry that hold the delivery's sequence number
SEQ_MASK = (1 << SEQ_BITS) - 1
MAX_SEQ = SEQ_MASK  # largest sequence number a session can be given


class _SessionRecord:
    """What the log knows about one session (see the module docstring)."""

    __slots__ = ("incarnation", "seq", "last_active", "entries")

    def __init__(self, incarnation: int, now: float) -> None:
        self.incarnation = incarnation
        self.seq = 0
        self.last_active = now
        self.entries: dict[str, int] = {}


def _check_version(version: object) -> None:
    # A negative or non-int version would corrupt the packed entry.
    if version.__class__ is not int or version < 0:
        raise InvalidRequest(f"version must be a non-negative int, got {version!r}")


class DeliveryLog:
    """Per-session read tracking for one shard.

    Example::

        log = DeliveryLog(DeliveryLogConfig(ttl_seconds=600))
        s = SessionRef("planner", "run-7")
        inc, seq = log.record(s, key, 3)          # key at version 3 was returned to s
        log.read_set(s, incarnation=inc)          # {key: 3}: what a commit must validate
        log.advance(s, {key: 4})                  # s committed key -> version 4

    Incarnations are unique only within one DeliveryLog. A shard that
    restarts starts a new, empty log whose counter starts over, so a number
    issued before the restart could be issued again afterwards. Pair the
    incarnation with the shard's epoch (specs/engine.md, "Sessions, deliveries,
    tokens"),
    or seed ``first_incarnation`` from it, so that a pre-restart number never
    matches a post-restart record.

    ``clock`` must not go backwards (``time.monotonic`` by default); tests
    pass a fake one.
    """

    def __init__(
        self,
        config: DeliveryLogConfig | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        first_incarnation: int = 1,
    ) -> None:
        if first_incarnation < 1:
            raise ValueError(f"first_incarnation must be >= 1, got {first_incarnation!r}")
        self.config = config if config is not None else DeliveryLogConfig()
        self._clock = clock
        self._ttl = self.config.ttl_seconds
        self._max_entries = self.config.max_entries_per_session
        self._max_sessions = self.config.max_sessions
        # Least recently active first: the TTL sweep pops from the front only.
        self._sessions: OrderedDict[SessionRef, _SessionRecord] = OrderedDict()
        self._first_incarnation = first_incarnation
        self._next_incarnation = first_incarnation
        self._entry_count = 0
        self._expired_count = 0
        self._evicted_count = 0

    # ------------------------------------------------------------------ reads

    def record(self, session: SessionRef, key: str, version: int) -> tuple[int, int]:
        """Log that ``key`` at ``version`` was returned to ``session``.

        Re-reading a key replaces its entry (new version, new sequence
        number). Creates the session's record if it has none (or its record
        had expired). Returns ``(incarnation, seq)``, ``seq`` being the
        sequence number given to this delivery.

        Raises LimitExceeded, changing nothing, if ``key`` is new to the
        session and the session is at ``max_entries_per_session``. A record
        created when ``max_sessions`` records are live evicts the least
        recently active one (which then fails closed).
        """
        _check_version(version)
        now = self._clock()
        rec = self._lookup(session, now)
        if rec is None:
            rec = self._create(session, now)
        else:
            self._check_room(session, rec, 0 if key in rec.entries else 1, 1)
            self._touch(session, rec, now)
        entries = rec.entries
        before = len(entries)
        seq = rec.seq = rec.seq + 1
        entries.pop(key, None)  # re-insert: the dict stays ordered by seq
        entries[key] = version << SEQ_BITS | seq
        self._entry_count += len(entries) - before
        return rec.incarnation, seq

    def record_many(self, session: SessionRef, items: Iterable[tuple[str, int]]) -> tuple[int, int]:
        """Log several deliveries to ``session`` at once, all or nothing.

        Each ``(key, version)`` gets the next sequence number, in order (a key
        listed twice keeps its last version). Returns ``(incarnation, seq)``
        with ``seq`` the sequence number of the first item; with no items it
        is the number the next delivery will get, which makes
        ``record_many(session, ())`` the way to open a transaction scope:
        it creates the record if needed and returns the ``since_seq`` to use.

        Raises LimitExceeded, changing nothing, as ``record`` does.
        """
        items = list(items)
        for _, version in items:
            _check_version(version)
        now = self._clock()
        rec = self._lookup(session, now)
        if rec is None:
            new_keys = len({key for key, _ in items})
            if new_keys > self._max_entries:
                raise self._entries_full(session, 0, new_keys)
            rec = self._create(session, now)
        else:
            entries = rec.entries
            new_keys = len({key for key, _ in items if key not in entries})
            self._check_room(session, rec, new_keys, len(items))
            self._touch(session, rec, now)
        entries = rec.entries
        before = len(entries)
        first = rec.seq + 1
        seq = rec.seq
        pop = entries.pop
        for key, version in items:
            seq += 1
            pop(key, None)  # re-insert: the dict stays ordered by seq
            entries[key] = version << SEQ_BITS | seq
        rec.seq = seq
        self._entry_count += len(entries) - before
        return rec.incarnation, first

    def read_set(
        self,
        session: SessionRef,
        *,
        incarnation: int | None = None,
        since_seq: int | None = None,
    ) -> dict[str, int]:
        """The session's logged ``{key: version}``, the read set a commit validates.

        ``since_seq`` selects the transaction scope: only deliveries whose
        sequence number is ``>= since_seq``. Without it, every logged entry
        (session scope).

        With ``incarnation`` (what this shard gave the session earlier), the
        call fails closed: SessionExpired if the session has no record here
        or a record of another incarnation, with a message saying whether it
        idled past the TTL, was recreated, or the number was never issued by
        this log (the shard restarted). Without ``incarnation``, a session
        with no record has nothing to validate and gets ``{}``.
        """
        now = self._clock()
        rec = self._sessions.get(session)
        if rec is not None and now - rec.last_active > self._ttl:
            idle = now - rec.last_active
            self._expire(session, rec)
            if incarnation == rec.incarnation:
                raise SessionExpired(
                    f"session {session} was idle for {idle:g}s, over the {self._ttl:g}s TTL;"
                    " its reads on this shard are no longer tracked",
                    session=str(session),
                    incarnation=incarnation,
                    reason="ttl",
                )
            rec = None
        if rec is None:
            if incarnation is None:
                return {}
            raise self._missing(session, incarnation)
        if incarnation is not None and incarnation != rec.incarnation:
            raise self._mismatch(session, incarnation, rec.incarnation)
        self._touch(session, rec, now)
        if since_seq is None:
            return {key: entry >> SEQ_BITS for key, entry in rec.entries.items()}
        # Entries are kept in seq order (a re-read re-inserts its key; advance keeps an
        # existing key's seq and appends new keys with new ones), so the transaction
        # scope is a suffix: walk back from the newest and stop at the first older one.
        # Cost: the scope's size, not the session's.
        found: dict[str, int] = {}
        for key, entry in reversed(rec.entries.items()):
            if entry & SEQ_MASK < since_seq:
                break
            found[key] = entry >> SEQ_BITS
        return found

    # ----------------------------------------------------------------- writes

    def advance(self, session: SessionRef, versions: dict[str, int]) -> int:
        """After ``session`` committed, make its own writes current for it.

        Each key in ``versions`` gets the committed version, so the session's
        own write is never stale to itself. An entry already logged keeps its
        sequence number (it stays in or out of a transaction scope as
        before); a key not yet logged gets a new one. Returns the incarnation.

        This never raises LimitExceeded: a commit must not fail after it was
        applied, so a session may go past ``max_entries_per_session`` by the
        commit's keys, and a record created here may go past
        ``max_sessions``.

        If the session had no live record, one is created, with a new
        incarnation and only these entries. A caller that validated the
        commit under incarnation N and gets another number back must keep
        N for the session (whose next commit then fails closed), not adopt
        the new one: the reads made under N are gone.
        """
        for version in versions.values():
            _check_version(version)
        now = self._clock()
        rec = self._lookup(session, now)
        if rec is None:
            rec = self._create(session, now, enforce_cap=False)
        else:
            self._touch(session, rec, now)
            if rec.seq + len(versions) > MAX_SEQ:
                # Out of sequence numbers (~10**12 deliveries): rather than
                # fail an applied commit, start a new incarnation, which the
                # session's next commit sees as an expiry.
                self._remove(session, rec)
                rec = self._create(session, now, enforce_cap=False)
        entries = rec.entries
        before = len(entries)
        seq = rec.seq
        for key, version in versions.items():
            old = entries.get(key)
            if old is None:
                seq += 1
                entries[key] = version << SEQ_BITS | seq
            else:
                entries[key] = version << SEQ_BITS | (old & SEQ_MASK)
        rec.seq = seq
        self._entry_count += len(entries) - before
        return rec.incarnation

    def forget(self, session: SessionRef, keys: Iterable[str]) -> int:
        """Stop tracking ``keys`` for ``session``; returns how many were logged.

        The session's later commits no longer depend on those reads (the
        agent has dropped them from its context).
        """
        now = self._clock()
        rec = self._lookup(session, now)
        if rec is None:
            return 0
        self._touch(session, rec, now)
        entries = rec.entries
        before = len(entries)
        for key in keys:
            entries.pop(key, None)
        removed = before - len(entries)
        self._entry_count -= removed
        return removed

    def reset(self, session: SessionRef) -> int:
        """Drop every entry of ``session`` but keep its record and incarnation.

        A client still holding the incarnation is not told it expired; its
        next commit simply depends on no earlier read. The sequence counter
        keeps going, so open transaction scopes stay correct. Returns how
        many entries were dropped.
        """
        now = self._clock()
        rec = self._lookup(session, now)
        if rec is None:
            return 0
        self._touch(session, rec, now)
        removed = len(rec.entries)
        rec.entries = {}
        self._entry_count -= removed
        return removed

    def reset_all(self) -> int:
        """``reset`` every session at once (S-Bus ``/admin/reset``): every entry goes,
        every record and incarnation stays. Returns how many sessions had entries."""
        emptied = 0
        for rec in self._sessions.values():
            if rec.entries:
                emptied += 1
                rec.entries = {}
        self._entry_count = 0
        return emptied

    def drop(self, session: SessionRef) -> bool:
        """Remove the session's record entirely; returns whether it had one.

        A commit presenting the old incarnation then fails with
        SessionExpired, and the session's next read starts a new incarnation.
        """
        rec = self._sessions.get(session)
        if rec is None:
            return False
        self._remove(session, rec)
        return True

    # --------------------------------------------------------------- sessions

    def incarnation_of(self, session: SessionRef) -> int | None:
        """The session's current incarnation, or None if it has no live record.

        Expires the record first if it is idle; does not count as activity.
        """
        rec = self._lookup(session, self._clock())
        return None if rec is None else rec.incarnation

    def delivered(self, session: SessionRef) -> dict[str, int]:
        """The session's logged ``{key: version}`` without validating or touching it.

        For views (dashboards, S-Bus register's skip-if-read rule); a commit
        uses ``read_set``, which fails closed.
        """
        rec = self._lookup(session, self._clock())
        if rec is None:
            return {}
        return {key: entry >> SEQ_BITS for key, entry in rec.entries.items()}

    def recent_sessions(self, limit: int) -> list[tuple[SessionRef, dict[str, int], float]]:
        """Up to ``limit`` live sessions, most recently active first, each with its
        logged ``{key: version}`` and seconds idle. Does not count as activity."""
        now = self._clock()
        found: list[tuple[SessionRef, dict[str, int], float]] = []
        for session, rec in reversed(self._sessions.items()):
            if len(found) >= limit:
                break
            idle = now - rec.last_active
            if idle > self._ttl:
                continue
            entries = {key: entry >> SEQ_BITS for key, entry in rec.entries.items()}
            found.append((session, entries, idle))
        return found

    def touch(self, session: SessionRef) -> bool:
        """Mark the session active (keeps it from expiring); returns whether it has a record.

        An idle record is expired rather than revived.
        """
        now = self._clock()
        rec = self._lookup(session, now)
        if rec is None:
            return False
        self._touch(session, rec, now)
        return True

    def expire_idle(self, now: float | None = None) -> int:
        """Expire every session idle for longer than the TTL; returns how many.

        Sessions are ordered by last activity, so this only inspects the
        idle ones plus the first live one.
        """
        if now is None:
            now = self._clock()
        sessions = self._sessions
        ttl = self._ttl
        count = 0
        while sessions:
            session = next(iter(sessions))
            rec = sessions[session]
            if not now - rec.last_active > ttl:
                break
            self._expire(session, rec)
            count += 1
        return count

    def stats(self) -> dict[str, int]:
        """Counters: live ``sessions`` records, logged ``entries``, sessions ``expired``
        (idle past the TTL) and ``evicted`` (over ``max_sessions``) so far."""
        return {
            "sessions": len(self._sessions),
            "entries": self._entry_count,
            "expired": self._expired_count,
            "evicted": self._evicted_count,
        }

    # --------------------------------------------------------------- internal

    def _lookup(self, session: SessionRef, now: float) -> _SessionRecord | None:
        """The session's record, expiring it first if it idled past the TTL."""
        rec = self._sessions.get(session)
        if rec is not None and now - rec.last_active > self._ttl:
            self._expire(session, rec)
            return None
        return rec

    def _touch(self, session: SessionRef, rec: _SessionRecord, now: float) -> None:
        rec.last_active = now
        self._sessions.move_to_end(session)

    def _create(
        self, session: SessionRef, now: float, *, enforce_cap: bool = True
    ) -> _SessionRecord:
        if len(self._sessions) >= self._max_sessions:
            self.expire_idle(now)
            while enforce_cap and len(self._sessions) >= self._max_sessions:
                # The most idle session goes; its next commit fails closed (SessionExpired).
                oldest = next(iter(self._sessions))
                self._remove(oldest, self._sessions[oldest])
                self._evicted_count += 1
        rec = _SessionRecord(self._next_incarnation, now)
        self._next_incarnation += 1
        self._sessions[session] = rec  # newest activity: goes to the end
        return rec

    def _remove(self, session: SessionRef, rec: _SessionRecord) -> None:
        del self._sessions[session]
        self._entry_count -= len(rec.entries)

    def _expire(self, session: SessionRef, rec: _SessionRecord) -> None:
        self._remove(session, rec)
        self._expired_count += 1

    def _check_room(
        self, session: SessionRef, rec: _SessionRecord, new_keys: int, new_seqs: int
    ) -> None:
        if new_keys and len(rec.entries) + new_keys > self._max_entries:
            raise self._entries_full(session, len(rec.entries), new_keys)
        if rec.seq + new_seqs > MAX_SEQ:
            raise LimitExceeded(
                f"session {session} has used all {MAX_SEQ} delivery sequence numbers"
                " on this shard; drop the session and start a new one",
                session=str(session),
                limit=MAX_SEQ,
            )

    def _entries_full(self, session: SessionRef, have: int, new_keys: int) -> LimitExceeded:
        adding = "one more key" if new_keys == 1 else f"{new_keys} more keys"
        return LimitExceeded(
            f"session {session} has {have} deliveries on this shard (limit"
            f" {self._max_entries}) and this read adds {adding};"
            " forget keys or reset the session",
            session=str(session),
            entries=have,
            adding=new_keys,
            limit=self._max_entries,
        )

    def _issued(self, incarnation: int) -> bool:
        return self._first_incarnation <= incarnation < self._next_incarnation

    def _missing(self, session: SessionRef, incarnation: int) -> SessionExpired:
        if not self._issued(incarnation):
            return self._restarted(session, incarnation)
        return SessionExpired(
            f"session {session} has no record on this shard: incarnation {incarnation}"
            " expired after idling past the TTL, was evicted over the session cap or"
            " was dropped; its reads here are no longer tracked",
            session=str(session),
            incarnation=incarnation,
            reason="no_record",
        )

    def _mismatch(self, session: SessionRef, incarnation: int, current: int) -> SessionExpired:
        if not self._issued(incarnation):
            return self._restarted(session, incarnation)
        return SessionExpired(
            f"session {session} is incarnation {current} on this shard, not {incarnation}:"
            f" the record of incarnation {incarnation} expired or was dropped and a new one"
            " was started; reads made under the old one are no longer tracked",
            session=str(session),
            incarnation=incarnation,
            current=current,
            reason="recreated",
        )

    def _restarted(self, session: SessionRef, incarnation: int) -> SessionExpired:
        return SessionExpired(
            f"this shard's delivery log never issued incarnation {incarnation}"
            f" (session {session}): the shard restarted and lost the session's reads",
            session=str(session),
            incarnation=incarnation,
            reason="restarted",
        )
