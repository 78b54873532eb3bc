"""The bus's session table: on which shards each session has deliveries, with their tokens.

A token is (shard epoch, delivery-log incarnation). The table keeps the FIRST
token it saw for a (session, shard) and never overwrites it: if the shard
later answers with another token (it restarted, or the session expired there),
the deliveries made under the first one are lost and the next commit must fail
with SessionExpired — so the stale token is kept on purpose until the session
is reset.

Two parts:

* volatile: sessions of clients that track their own tokens (the SDK). Bounded;
  least recently used sessions go first — such a session is still protected by
  the tokens its client sends.
* durable (with a ``SessionJournal``): sessions of clients that send no tokens
  (HTTP agents). Each first token is journaled before the read that produced it
  is answered, and survives a restart of the bus.

Durable sessions are capped (``SessionLimits``) per agent, per client address
and in all. A new session over a cap evicts the least recently active session
of that group — one client opening sessions by the thousand evicts its own,
and cannot lock other agents out. An evicted session is *marked* in the
journal, so its next commit fails closed (SessionExpired) instead of passing
with the reads the bus forgot (``session_journal``: marks and acknowledgements).

Until agents authenticate, a caller proves it owns a durable session only with
the ``session_token`` handed to whoever opened the session while it was
unknown (``open``; the journal keeps its SHA-256, so it survives a restart). A reset
or forget by anyone else cannot make the session's next commit pass with
less validation: it marks the session instead (``reset`` / ``forget_by_other``).
"""

from __future__ import annotations

import hashlib
import secrets
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

from oribus.bus.session_journal import SessionJournal
from oribus.errors import SessionExpired
from oribus.messages import Token
from oribus.types import SessionRef


@dataclass(frozen=True, slots=True)
class SessionLimits:
    """Caps on the durable sessions (clients without tokens: HTTP agents)."""

    max_sessions: int = 1_000_000  # in all
    max_per_agent: int = 1_000  # of one agent name (every session id)
    max_per_client: int = 10_000  # opened from one client address

    def __post_init__(self) -> None:
        for name in ("max_sessions", "max_per_agent", "max_per_client"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")


CAPS = ("sessions", "agent", "client")  # the caps' names in counters and /metrics


class SessionTable:
    def __init__(self, max_sessions: int = 1_000_000, journal: SessionJournal | None = None,
                 limits: SessionLimits | None = None) -> None:
        self.max_sessions = max_sessions
        self.journal = journal
        self.limits = limits or SessionLimits()
        self._tokens: OrderedDict[SessionRef, dict[int, Token]] = OrderedDict()
        self._durable: dict[SessionRef, dict[int, Token]] = journal.table if journal is not None else {}
        # SHA-256 of the session_token of each session opened here (journaled)
        self._owners: dict[SessionRef, bytes] = journal.owners if journal is not None else {}
        # Durable sessions (the journal's entries: with reads, owned or acknowledged), least
        # recently active first, in all and per group, with the address each was opened from.
        self._active: OrderedDict[SessionRef, None] = OrderedDict()
        self._client: dict[SessionRef, str] = {}
        self._by_agent: dict[str, OrderedDict[SessionRef, None]] = {}
        self._by_client: dict[str, OrderedDict[SessionRef, None]] = {}
        self.evicted = dict.fromkeys(CAPS, 0)  # evictions per cap since start
        self._mark_reasons: OrderedDict[SessionRef, str] = OrderedDict()  # for messages only; bounded
        for session in self._durable:  # replayed: the address is not journaled
            self._index(session, "")

    def __len__(self) -> int:
        return len(self._tokens) + len(self._active)

    @property
    def durable_sessions(self) -> int:
        return len(self._active)

    def largest_groups(self) -> dict[str, int]:
        """Sessions of the busiest agent and of the busiest client address (for /metrics)."""
        return {"agent": max(map(len, self._by_agent.values()), default=0),
                "client": max(map(len, self._by_client.values()), default=0)}

    # ---- volatile sessions ------------------------------------------------------------------

    def observe(self, session: SessionRef, shard: int, token: Token) -> None:
        tokens = self._tokens.get(session)
        if tokens is None:
            tokens = self._tokens[session] = {}
            while len(self._tokens) > self.max_sessions:
                self._tokens.popitem(last=False)
        else:
            self._tokens.move_to_end(session)
        tokens.setdefault(shard, token)

    # ---- durable sessions -------------------------------------------------------------------

    async def observe_durably(self, session: SessionRef, shard: int, token: Token, client: str = "") -> None:
        """Record a token of a session without client-side tokens; returns once durable."""
        if self.journal is None:
            self.observe(session, shard, token)
            return
        await self._admit(session, client)
        tokens = self._durable.get(session)
        if tokens is not None and shard in tokens:
            return
        # The journal shows it only once durable: a read is never answered before its token is.
        await self.journal.observe(session, shard, token)
        self._index(session, client)

    def tokens(self, session: SessionRef) -> dict[int, Token]:
        merged = dict(self._tokens.get(session, {}))
        for shard, token in self._durable.get(session, {}).items():
            merged.setdefault(shard, token)
        return merged

    async def check_not_marked(self, session: SessionRef, client: str = "") -> None:
        """SessionExpired, once, for a durable session that was marked (evicted, or reset
        by a caller that did not prove it owns it); the refusal is journaled as its
        acknowledgement first, so the session's later commits are checked as usual."""
        if self.journal is None or session in self.journal.acked or not self.journal.is_marked(session):
            return
        await self._admit(session, client)
        await self.journal.ack(session)
        self._index(session, client)
        reason = self._mark_reasons.pop(session, "it was evicted over a session cap or reset by another caller")
        raise SessionExpired(
            f"session {session} may have lost reads the bus tracked: {reason}; they are no longer "
            "checked — read again what the commit depends on, then commit again",
            session=str(session), reason="marked",
        )

    def is_owner(self, session: SessionRef, session_token: object) -> bool:
        """Whether ``session_token`` is the one ``open`` gave for the session."""
        own = self._owners.get(session)
        return own is not None and isinstance(session_token, str) and secrets.compare_digest(
            own, hashlib.sha256(session_token.encode("utf-8", "surrogatepass")).digest())

    def has_reads(self, session: SessionRef) -> bool:
        return bool(self._durable.get(session))

    async def open(self, session: SessionRef, client: str = "") -> str | None:
        """A new ``session_token`` if the session is unknown here (no reads, no pending
        mark, nobody owns it), else None: nobody can claim a session in use."""
        if self.journal is None or session in self._active or (
                self.journal.is_marked(session) and session not in self.journal.acked):
            return None
        await self._admit(session, client)
        if session in self._active:  # opened concurrently
            return None
        token = secrets.token_urlsafe(24)
        await self.journal.own(session, hashlib.sha256(token.encode()).digest())
        self._index(session, client)
        return token

    async def reset(self, session: SessionRef, current: Mapping[int, Token | None] | None = None, *,
                    caller_owns: bool = True) -> bool:
        """Forget the session's tokens after its deliveries were dropped on every shard.

        ``current``: the token each shard holds for it now (a reset keeps the
        shard's record). If every kept token still matches, they stay — the
        common case, which then costs no journal write; a token that no longer
        matches (restart, expiry) is what the reset is for, and all go.

        ``caller_owns=False`` (the caller did not prove it owns a durable
        session): a session with tracked reads is marked instead, so its next
        commit fails closed. Returns whether it was marked.
        """
        current = current or {}
        volatile = self._tokens.get(session)
        if volatile is not None and any(current.get(s) != t for s, t in volatile.items()):
            self._tokens.pop(session, None)
        if not caller_owns:
            return await self.mark_lost_reads(session, "it was reset by a caller that did not present its "
                                                       "session_token")
        durable = self._durable.get(session)
        if durable is not None and any(current.get(s) != t for s, t in durable.items()):
            assert self.journal is not None
            await self.journal.reset(session)
            if session not in self._durable:  # owned and acknowledged ones stay, empty
                self._unindex(session)
        return False

    async def mark_lost_reads(self, session: SessionRef, reason: str) -> bool:
        """Mark a durable session with tracked reads so its next commit fails closed."""
        if self.journal is None or not self._durable.get(session):
            return False  # no tracked reads: nothing a commit could pass without
        await self.journal.mark(session)  # drops the owner too
        self._unindex(session)
        self._mark_reasons[session] = reason
        while len(self._mark_reasons) > 10_000:
            self._mark_reasons.popitem(last=False)
        return True

    async def clear_marks(self) -> None:
        """Every mark and acknowledgement gone (S-Bus ``/admin/reset``: every read log empty)."""
        if self.journal is not None:
            await self.journal.clear_marks()
            for session in [s for s in self._active if s not in self._durable]:
                self._unindex(session)
        self._mark_reasons.clear()

    def durable(self) -> list[SessionRef]:
        return list(self._active)

    # ---- caps -------------------------------------------------------------------------------

    async def _admit(self, session: SessionRef, client: str) -> None:
        """Make room for a new durable session: over a cap, the least recently active
        session of that group is evicted (marked: it fails closed). A known session is
        only marked active."""
        if session in self._active:
            self._touch(session)
            return
        limits = self.limits
        for cap, group, limit in (("agent", self._by_agent.get(session[0]), limits.max_per_agent),
                                  ("client", self._by_client.get(client), limits.max_per_client),
                                  ("sessions", self._active, limits.max_sessions)):
            while group and len(group) >= limit:
                victim = next(iter(group))
                self.evicted[cap] += 1
                which = "the session cap" if cap == "sessions" else f"the per-{cap} session cap"
                if not await self.mark_lost_reads(victim, f"it was evicted (least recently active) over "
                                                          f"{which} of {limit}"):
                    if victim in self._durable:  # an owned or acknowledged entry without reads
                        assert self.journal is not None
                        await self.journal.mark(victim)
                    self._unindex(victim)

    def _index(self, session: SessionRef, client: str) -> None:
        if session in self._active:
            self._touch(session)
            return
        self._active[session] = None
        self._client[session] = client
        self._by_agent.setdefault(session[0], OrderedDict())[session] = None
        self._by_client.setdefault(client, OrderedDict())[session] = None

    def _touch(self, session: SessionRef) -> None:
        self._active.move_to_end(session)
        self._by_agent[session[0]].move_to_end(session)
        self._by_client[self._client[session]].move_to_end(session)

    def _unindex(self, session: SessionRef) -> None:
        if self._active.pop(session, 0) is None:
            client = self._client.pop(session)
            for index, name in ((self._by_agent, session[0]), (self._by_client, client)):
                group = index[name]
                del group[session]
                if not group:
                    del index[name]
