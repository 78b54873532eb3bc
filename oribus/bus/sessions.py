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
  is answered, and survives a restart of the bus; these are never evicted
  (the journal refuses new sessions when full instead).
"""

from __future__ import annotations

from collections import OrderedDict

from oribus.bus.session_journal import SessionJournal
from oribus.protocol import Token
from oribus.types import SessionRef


class SessionTable:
    def __init__(self, max_sessions: int = 1_000_000, journal: SessionJournal | None = None) -> None:
        self.max_sessions = max_sessions
        self.journal = journal
        self._tokens: OrderedDict[SessionRef, dict[int, Token]] = OrderedDict()
        self._durable: dict[SessionRef, dict[int, Token]] = journal.table if journal is not None else {}

    def __len__(self) -> int:
        return len(self._tokens) + len(self._durable)

    @property
    def durable_sessions(self) -> int:
        return len(self._durable)

    def observe(self, session: SessionRef, shard: int, token: Token) -> None:
        tokens = self._tokens.get(session)
        if tokens is None:
            tokens = self._tokens[session] = {}
            while len(self._tokens) > self.max_sessions:
                self._tokens.popitem(last=False)
        else:
            self._tokens.move_to_end(session)
        tokens.setdefault(shard, token)

    async def observe_durably(self, session: SessionRef, shard: int, token: Token) -> None:
        """Record a token of a session without client-side tokens; returns once durable."""
        if self.journal is None:
            self.observe(session, shard, token)
            return
        tokens = self._durable.get(session)
        if tokens is not None and shard in tokens:
            return
        await self.journal.observe(session, shard, token)
        # Only after the journal has it: a read is never answered before its token is durable.
        self._durable.setdefault(session, {}).setdefault(shard, token)

    def tokens(self, session: SessionRef) -> dict[int, Token]:
        merged = dict(self._tokens.get(session, {}))
        for shard, token in self._durable.get(session, {}).items():
            merged.setdefault(shard, token)
        return merged

    async def reset(self, session: SessionRef, current: dict[int, Token | None] | None = None) -> None:
        """Forget the session's tokens after its deliveries were dropped on every shard.

        ``current``: the token each shard holds for it now (a reset keeps the
        shard's record). If every kept token still matches, they stay — the
        common case, which then costs no journal write; a token that no longer
        matches (restart, expiry) is what the reset is for, and all go.
        """
        current = current or {}
        volatile = self._tokens.get(session)
        if volatile is not None and any(current.get(s) != t for s, t in volatile.items()):
            self._tokens.pop(session, None)
        durable = self._durable.get(session)
        if durable is not None and any(current.get(s) != t for s, t in durable.items()):
            assert self.journal is not None
            await self.journal.reset(session)
            self._durable.pop(session, None)
