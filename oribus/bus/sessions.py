"""The bus's session table: on which shards each session has deliveries, with their tokens.

A token is (shard epoch, delivery-log incarnation). The table keeps the FIRST
token it saw for a (session, shard) and never overwrites it: if the shard
later answers with another token (it restarted, or the session expired there),
the deliveries made under the first one are lost and the next commit must fail
with SessionExpired — so the stale token is kept on purpose until the session
is reset. The table is bounded (least recently used sessions go first); a
session that falls out of it is still protected by the tokens its client sends.
"""

from __future__ import annotations

from collections import OrderedDict

from oribus.protocol import Token
from oribus.types import SessionRef


class SessionTable:
    def __init__(self, max_sessions: int = 1_000_000) -> None:
        self.max_sessions = max_sessions
        self._tokens: OrderedDict[SessionRef, dict[int, Token]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._tokens)

    def observe(self, session: SessionRef, shard: int, token: Token) -> None:
        tokens = self._tokens.get(session)
        if tokens is None:
            tokens = self._tokens[session] = {}
            while len(self._tokens) > self.max_sessions:
                self._tokens.popitem(last=False)
        else:
            self._tokens.move_to_end(session)
        tokens.setdefault(shard, token)

    def tokens(self, session: SessionRef) -> dict[int, Token]:
        return dict(self._tokens.get(session, {}))

    def reset(self, session: SessionRef) -> None:
        self._tokens.pop(session, None)
