"""A pure-Python reference model of the ORI commit rule, for one process.

The rule is stated in specs/engine.md, "The commit rule (ORI)".
It knows nothing of WALs, locks or tokens: only keys with versioned values,
per-session delivery logs per shard (with sequence numbers for transaction
scope), and which sessions lost their deliveries in a restart. Every outcome
the engine gives must be the one this model predicts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from oribus.errors import Stale

DELETED = object()


class Outcome:
    """What the model predicts for a commit."""

    def __init__(self, kind: str, versions: dict[str, int] | None = None, stale: list[Stale] | None = None):
        self.kind = kind  # "ok" | "conflict" | "expired" | "invalid"
        self.versions = versions or {}
        self.stale = sorted(stale or [])

    def __repr__(self) -> str:
        return f"Outcome({self.kind}, {self.versions}, {self.stale})"


@dataclass
class ModelSession:
    strict: bool = False
    entries: dict[int, dict[str, list[int]]] = field(default_factory=dict)  # shard -> key -> [version, seq]
    seq: dict[int, int] = field(default_factory=dict)
    tokens: set[int] = field(default_factory=set)  # shards this session holds a token for
    doomed: bool = False  # held tokens across a restart: commits fail until reset

    def record(self, shard: int, key: str, version: int) -> int:
        self.seq[shard] = self.seq.get(shard, 0) + 1
        self.entries.setdefault(shard, {})[key] = [version, self.seq[shard]]
        return self.seq[shard]


@dataclass
class ModelTxn:
    session: str
    reads: dict[str, int] = field(default_factory=dict)  # first version read per key
    since: dict[int, int] = field(default_factory=dict)  # shard -> seq of first read
    tokens: set[int] = field(default_factory=set)
    writes: dict[str, Any] = field(default_factory=dict)
    doomed: bool = False


class Model:
    def __init__(self, shard_for, history_limit: int) -> None:
        self.shard_for = shard_for
        self.history_limit = history_limit
        self.history: dict[str, list[tuple[int, Any]]] = {}  # key -> [(version, value)], oldest first
        self.sessions: dict[str, ModelSession] = {}

    # ---- state --------------------------------------------------------------------

    def version(self, key: str) -> int:
        h = self.history.get(key)
        return h[-1][0] if h else 0

    def value(self, key: str) -> Any:
        h = self.history.get(key)
        return h[-1][1] if h else None

    def kept(self, key: str) -> list[tuple[int, Any]]:
        return self.history.get(key, [])[-self.history_limit:]

    # ---- operations -----------------------------------------------------------------

    def read(self, name: str, keys: list[str], txn: ModelTxn | None = None) -> dict[str, tuple[Any, int]]:
        s = self.sessions[name]
        first_seq: dict[int, int] = {}
        for k in keys:
            shard = self.shard_for(k)
            seq = s.record(shard, k, self.version(k))
            first_seq.setdefault(shard, seq)
            s.tokens.add(shard)
        if txn is not None:
            for shard, seq in first_seq.items():
                txn.since.setdefault(shard, seq)
                txn.tokens.add(shard)
            for k in keys:
                txn.reads.setdefault(k, self.version(k))
        return {k: (self.value(k), self.version(k)) for k in keys}

    def _check(
        self,
        s: ModelSession,
        logged: dict[str, int],
        explicit: dict[str, int],
        expect: dict[str, int],
        written: list[str],
    ) -> list[Stale]:
        stale: list[Stale] = []
        reported: set[str] = set()
        for k, v in logged.items():
            if self.version(k) != v:
                stale.append(Stale(k, v, self.version(k), "stale_read"))
                reported.add(k)
        for k, v in explicit.items():
            if self.version(k) != v and k not in reported:
                stale.append(Stale(k, v, self.version(k), "stale_read"))
                reported.add(k)
        for k, e in expect.items():
            if self.version(k) != e:
                stale.append(Stale(k, e, self.version(k), "expected_version"))
                reported.add(k)
        if s.strict:
            for k in written:
                if k not in logged and k not in explicit and k not in expect:
                    stale.append(Stale(k, None, self.version(k), "blind_write"))
        return stale

    def _apply(self, name: str, s: ModelSession, new_values: dict[str, Any]) -> dict[str, int]:
        versions = {}
        for k, v in new_values.items():
            ver = self.version(k) + 1
            self.history.setdefault(k, []).append((ver, v))
            versions[k] = ver
            shard = self.shard_for(k)
            ent = s.entries.setdefault(shard, {})
            if k in ent:
                ent[k][0] = ver
            else:
                s.seq[shard] = s.seq.get(shard, 0) + 1
                ent[k] = [ver, s.seq[shard]]
            s.tokens.add(shard)
        return versions

    def commit(
        self,
        name: str,
        writes: dict[str, Any],
        expect: dict[str, int] | None = None,
        explicit: dict[str, int] | None = None,
        rollback: dict[str, int] | None = None,
    ) -> Outcome:
        """A session-scope commit (``bus.commit`` / ``bus.rollback``)."""
        s = self.sessions[name]
        expect, explicit, rollback = expect or {}, explicit or {}, rollback or {}
        if s.doomed and s.tokens:
            return Outcome("expired")
        new_values = dict(writes)
        for k, target in rollback.items():
            cur = self.version(k)
            if target == 0:
                new_values[k] = None
                continue
            kept = dict(self.kept(k))
            if target > cur or target not in kept:
                return Outcome("invalid")
            new_values[k] = kept[target]
        logged = {k: v for ent in s.entries.values() for k, (v, _seq) in ent.items()}
        stale = self._check(s, logged, explicit, expect, list(new_values))
        if stale:
            return Outcome("conflict", stale=stale)
        return Outcome("ok", versions=self._apply(name, s, new_values))

    def commit_txn(self, txn: ModelTxn) -> Outcome:
        """A transaction-scope commit."""
        s = self.sessions[txn.session]
        if txn.doomed:
            return Outcome("expired")
        logged = {}
        for shard, since in txn.since.items():
            for k, (v, seq) in s.entries.get(shard, {}).items():
                if seq >= since:
                    logged[k] = v
        stale = self._check(s, logged, txn.reads, {}, list(txn.writes))
        if stale:
            return Outcome("conflict", stale=stale)
        return Outcome("ok", versions=self._apply(txn.session, s, dict(txn.writes)))

    def forget(self, name: str, keys: list[str]) -> None:
        s = self.sessions[name]
        for k in keys:
            s.entries.get(self.shard_for(k), {}).pop(k, None)

    def reset(self, name: str) -> None:
        s = self.sessions[name]
        for ent in s.entries.values():
            ent.clear()
        s.tokens.clear()
        s.doomed = False

    def restart(self, open_txns: list[ModelTxn]) -> None:
        """Every shard restarts: delivery logs are lost; holders of tokens fail closed."""
        for s in self.sessions.values():
            s.entries = {}
            s.seq = {}
            if s.tokens:
                s.doomed = True
        for t in open_txns:
            if t.tokens:
                t.doomed = True
