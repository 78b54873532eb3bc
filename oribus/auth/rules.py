"""The decisions: may this identity do this operation on this key, and whose is a session
(specs/auth.md §4, §5). Pure functions over ``Policy`` and ``Identity``: no IO, no clock.

What each bus operation needs (the guard, ``oribus.bus.guarded``, asks for each key)::

    get / get_many           READ on every key
    scan                     READ: the keys the caller may not read are left out
    commit                   READ on every key of read_set and expect, WRITE on every key
                             written, ROLLBACK on every key rolled back; one refusal
                             refuses the whole commit
    watch                    WATCH on the prefix (a pattern must cover all of it)
    history                  HISTORY on the key
    forget / reset / commit  the session's owner (``SessionOwners``)
    operator views           ADMIN (all sessions); others see the sessions they own

An operation is allowed when any of the identity's roles allows it. Reserved keys
(``oribus.types.RESERVED_PREFIXES``: the server's own metadata) are granted by no pattern.
"""

from __future__ import annotations

from enum import StrEnum
from typing import NamedTuple

from oribus.auth.policy import Policy
from oribus.auth.tokens import Identity
from oribus.types import RESERVED_PREFIXES, SessionRef


class Operation(StrEnum):
    READ = "read"
    WRITE = "write"
    WATCH = "watch"
    HISTORY = "history"
    ROLLBACK = "rollback"
    ADMIN = "admin"


class Decision(NamedTuple):
    allowed: bool
    rule: str  # what allowed it ("role writer: write plans/*") or why not


def decide(policy: Policy, identity: Identity, operation: Operation, key: str = "") -> Decision:
    """Whether ``identity`` may do ``operation`` on ``key`` (for WATCH: every key under the
    prefix ``key``; for ADMIN the key is ignored)."""
    if operation is not Operation.ADMIN and key.startswith(RESERVED_PREFIXES):
        return Decision(False, f"{key!r} is reserved to the server: no role grants it")
    for name in identity.roles:
        role = policy.roles.get(name)
        if role is None:
            continue
        if operation is Operation.ADMIN:
            if role.admin:
                return Decision(True, f"role {name}: admin")
            continue
        grant = role.grant(operation.value)
        pattern = grant.covers_prefix(key) if operation is Operation.WATCH else grant.covers_key(key)
        if pattern is not None:
            return Decision(True, f"role {name}: {operation.value} {pattern}")
    roles = ", ".join(identity.roles) or "none"
    what = "admin" if operation is Operation.ADMIN else f"{operation.value} on {key!r}"
    return Decision(False, f"no role of [{roles}] grants {what}")


class Access:
    """What a set of roles is granted for one operation, merged across the roles and compiled
    for the bus's hot path: ``allows(key)`` is a set lookup and one C-level
    ``str.startswith`` over every granted prefix — the same answer as ``decide`` (a test holds
    them to it), without a loop over roles and patterns, and without a table that grows with
    every key ever asked about. ``decide`` stays the reference, and says *why* on a refusal."""

    __slots__ = ("admin", "keys", "prefixes")

    def __init__(self, policy: Policy, roles: tuple[str, ...], operation: Operation) -> None:
        keys: set[str] = set()
        prefixes: list[str] = []
        admin = False
        for name in roles:
            role = policy.roles.get(name)
            if role is None:
                continue
            admin = admin or role.admin
            grant = role.grant(operation.value)
            if operation is not Operation.WATCH:  # a literal key never covers a watched prefix
                keys |= grant.keys
            prefixes.extend(grant.prefixes)
        # ADMIN ignores the key; the others grant no reserved key
        self.admin: bool | None = admin if operation is Operation.ADMIN else None
        self.keys = frozenset(keys)
        self.prefixes = tuple(sorted(set(prefixes)))

    def allows(self, key: str) -> bool:
        if self.admin is not None:
            return self.admin
        if key.startswith(RESERVED_PREFIXES):
            return False
        return key in self.keys or key.startswith(self.prefixes)


def may_act_for(policy: Policy, identity: Identity, agent: str) -> bool:
    """Whether ``identity`` may name ``agent`` in a request: its own name, or one its token's
    ``act_for`` or one of its roles' ``act_for`` lists (``*``: any)."""
    if agent == identity.agent:
        return True
    if agent in identity.act_for or "*" in identity.act_for:
        return True
    for name in identity.roles:
        role = policy.roles.get(name)
        if role is not None and (agent in role.act_for or "*" in role.act_for):
            return True
    return False


class SessionOwners:
    """Which identity owns each session: the first that used it (specs/auth.md §5).

    A session is named by the agent of the request; an identity may name only agents it
    acts for (``may_act_for``), so an ordinary agent can reach only its own sessions. The
    record settles the rest: a session an orchestrator opened for agent B is the
    orchestrator's, and one B opened is B's, whichever of the two comes second.

    ``owners``: a table to adopt, the bus's session journal's (``SessionJournal.identities``,
    replayed at start: ownership outlives a restart of the bus); the guard journals each new
    claim before the call that made it goes on. Bounded: past ``capacity`` the oldest record
    is dropped (from the journal too at its next compaction), and the next user of that
    session claims it again.
    """

    def __init__(self, capacity: int = 1_000_000, owners: dict[SessionRef, str] | None = None) -> None:
        self.capacity = capacity
        self._owner: dict[SessionRef, str] = owners if owners is not None else {}  # in the order claimed

    def __len__(self) -> int:
        return len(self._owner)

    def owner(self, session: SessionRef) -> str | None:
        return self._owner.get(session)

    def check(self, identity: Identity, session: SessionRef) -> str | None:
        """None if ``identity`` may use ``session`` (it owns it, or nobody does yet), else the
        owner's name. Changes nothing."""
        owner = self._owner.get(session)
        return None if owner is None or owner == identity.agent else owner

    def claim(self, identity: Identity, session: SessionRef) -> str | None:
        """As ``check``; when allowed, records ``identity`` as the owner (if nobody was)."""
        owner = self._owner.get(session)
        if owner is None:
            self._owner[session] = identity.agent
            if len(self._owner) > self.capacity:
                del self._owner[next(iter(self._owner))]
            return None
        return None if owner == identity.agent else owner

    def release(self, session: SessionRef) -> None:
        """Forget ``session``'s owner (its claim could not be recorded)."""
        self._owner.pop(session, None)

    def visible(self, identity: Identity, session: SessionRef) -> bool:
        """Whether a listing of sessions shows ``session`` to ``identity`` (its own)."""
        owner = self._owner.get(session)
        return owner == identity.agent if owner is not None else session[0] == identity.agent
