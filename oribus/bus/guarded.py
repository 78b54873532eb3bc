"""``GuardedBus``: the access rules enforced in front of a ``Bus`` (specs/auth.md §1, §4, §5).

A bus started with ``--auth`` serves this instead of its ``Bus`` on every transport (the
gRPC and stream listeners bind their operations to it; the HTTP gateway's ``/v1`` routes
call it). Each operation, before it calls the bus — so before any shard is contacted:

1. authenticates the call's credential (``oribus.auth.credential.CREDENTIAL``, set by the
   transport; without a token, an agent's client certificate, ``CERTIFICATE``):
   Unauthenticated if there is none or it is refused;
2. checks the agent the request names: the identity's own, or one it may act for;
3. checks the session's owner (``SessionOwners``) for everything that uses a session: a
   recording read, a commit, forget, reset, opening it. The first identity to use a
   session becomes its owner, journaled (``SessionJournal.own_by``) before the call goes
   on, so that after a restart of the bus another identity still cannot use it; calls of
   the same identity on that session meanwhile wait for the record too;
4. checks every key the operation names (``oribus.auth.rules``): a read of a key the caller
   may not read is refused whole (no delivery is recorded for any of its keys), a commit
   with one forbidden key is refused whole (nothing is written), a watch is refused before
   it subscribes. A scan leaves out the keys the caller may not read; the operators' list of
   sessions shows the caller's own sessions, and only the keys it may read (admin: all).

Bad input (a session that is not two strings, a key that is not one) is left to the bus,
which refuses it before contacting a shard too: the guard only makes sure it checked
something well-formed first.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

from oribus.auth import Authority, Identity, Operation, SessionOwners
from oribus.auth.credential import CERTIFICATE, CREDENTIAL
from oribus.bus.bus import Bus, _check_session
from oribus.contract import BusService, CommitRequest, CommitResult, Entry, ReadResult
from oribus.errors import InvalidRequest
from oribus.messages import Change, ReadItem, WatchRequest
from oribus.types import (
    DEFAULT_SCAN_LIMIT,
    DEFAULT_SESSIONS_LISTED,
    SessionRef,
    validate_key,
    validate_prefix,
)

_KEY_COLLECTIONS = (list, tuple, dict)  # a tuple of types: isinstance checks it faster than a union


class GuardedBus(BusService):
    """``bus`` behind ``authority``'s rules; the same operations, the same signatures."""

    def __init__(self, bus: Bus, authority: Authority, owners: SessionOwners | None = None) -> None:
        self.bus = bus
        self.authority = authority
        # the owners the bus's session journal holds (replayed at start), journaled as claimed
        self.journal = bus.sessions.journal
        if owners is None:
            owners = SessionOwners(owners=self.journal.identities if self.journal is not None else None)
        self.owners = owners
        self._recording: dict[SessionRef, asyncio.Future[None]] = {}  # claims being journaled

    # ---- what the transports read besides the operations (no key, no session) -----------------

    @property
    def sessions(self) -> Any:
        return self.bus.sessions

    @property
    def max_value_bytes(self) -> int:
        return self.bus.max_value_bytes

    @property
    def validation_enabled(self) -> bool:
        return self.bus.validation_enabled

    # ---- the checks ------------------------------------------------------------------------------

    def caller(self, op: str) -> Identity:
        """The identity of the call in progress, or Unauthenticated."""
        token = CREDENTIAL.get()
        return self.authority.authenticate(token, op, None if token else CERTIFICATE.get())

    def _owned(self, identity: Identity, session: SessionRef) -> bool:
        """The common call, checked without more: the session of the identity's own agent,
        which it claimed (so it was checked) before, its claim journaled."""
        return (type(session) is SessionRef and self.owners.owner(session) == identity.agent
                and session[0] == identity.agent and session not in self._recording)

    async def _session(self, identity: Identity, session: SessionRef, op: str, *, claim: bool = True) -> None:
        _check_session(session)  # InvalidRequest before anything is recorded
        agent = session[0]
        if not self.authority.may_act_for(identity, agent):
            raise self.authority.denied(identity, op, "", f"{identity.agent} may not act for agent {agent!r}")
        session = SessionRef(agent, session[1])
        while True:
            owner = self.owners.check(identity, session)
            if owner is not None:
                raise self.authority.denied(identity, op, "", f"session {agent}/{session[1]} belongs to {owner}")
            pending = self._recording.get(session)
            if pending is None:
                break
            # its claim is on its way to the journal: nobody's until durable (then check again:
            # a claim that could not be journaled was released)
            await asyncio.shield(pending)
        if claim and self.owners.owner(session) is None:
            self.owners.claim(identity, session)  # at once: a concurrent claim by another identity is refused
            if self.journal is not None:
                await self._journal_claim(identity, session)

    async def _journal_claim(self, identity: Identity, session: SessionRef) -> None:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._recording[session] = done
        try:
            assert self.journal is not None
            await self.journal.own_by(session, identity.agent)
        except BaseException:
            self.owners.release(session)  # not journaled: not claimed (this call fails)
            raise
        finally:
            del self._recording[session]
            done.set_result(None)  # whoever waited checks the owner again

    def _keys(self, identity: Identity, operation: Operation, keys: Any, op: str) -> None:
        if not keys:  # the usual commit's expect and rollback: nothing to check
            if not isinstance(keys, _KEY_COLLECTIONS):
                raise InvalidRequest("keys must be a list of str")
            return
        if not isinstance(keys, _KEY_COLLECTIONS):
            raise InvalidRequest("keys must be a list of str")
        allows = self.authority.access(identity, operation).allows  # compiled once per roles and operation
        for key in keys:
            if not isinstance(key, str):  # the rest of a key's form the bus checks, before any shard
                validate_key(key)
            if not allows(key):
                raise self.authority.refusal(identity, operation, key, op)

    # ---- the operations -------------------------------------------------------------------------------

    async def read(self, session: SessionRef, keys: list[str], record: bool = True, only_new: bool = False,
                   **kw: Any) -> ReadResult:
        identity = self.caller("read")
        self._keys(identity, Operation.READ, keys, "read")
        if not self._owned(identity, session):
            await self._session(identity, session, "read", claim=record)
        return await self.bus.read(session, keys, record, only_new, **kw)

    async def commit(self, req: CommitRequest, **kw: Any) -> CommitResult:
        identity = self.caller("commit")
        if kw.get("may_write_reserved"):  # the server's own writes never come through here
            raise InvalidRequest("may_write_reserved is not for callers")
        # (an empty dict, as a commit's expect and rollback usually are, needs no check)
        if req.read_set or type(req.read_set) is not dict:
            self._keys(identity, Operation.READ, req.read_set, "commit")
        if req.expect or type(req.expect) is not dict:
            self._keys(identity, Operation.READ, req.expect, "commit")
        if req.writes or type(req.writes) is not dict:
            self._keys(identity, Operation.WRITE, req.writes, "commit")
        if req.rollback or type(req.rollback) is not dict:
            self._keys(identity, Operation.ROLLBACK, req.rollback, "commit")
        if not self._owned(identity, req.session):
            await self._session(identity, req.session, "commit")
        return await self.bus.commit(req, **kw)

    async def history(self, key: str, limit: int | None = None) -> list[Entry]:
        identity = self.caller("history")
        validate_key(key)
        self.authority.require(identity, Operation.HISTORY, key, op="history")
        return await self.bus.history(key, limit)

    async def forget(self, session: SessionRef, keys: list[str], *, caller_owns: bool = True) -> bool:
        identity = self.caller("forget")
        await self._session(identity, session, "forget")
        return await self.bus.forget(session, keys)  # the credential proved it owns the session

    async def reset(self, session: SessionRef, *, caller_owns: bool = True) -> bool:
        identity = self.caller("reset")
        await self._session(identity, session, "reset")
        return await self.bus.reset(session)

    async def open_session(self, session: SessionRef, client: str = "") -> str | None:
        identity = self.caller("open_session")
        await self._session(identity, session, "open_session")
        return await self.bus.open_session(session, client)

    async def stats(self) -> dict:
        self.caller("stats")  # any identity: counters, no key and no value
        return await self.bus.stats()

    async def shard_stats(self, timeout: float | None = None) -> dict[int, dict]:
        return await (self.bus.shard_stats() if timeout is None else self.bus.shard_stats(timeout))

    async def scan(self, prefix: str = "", after: str = "", limit: int = DEFAULT_SCAN_LIMIT) -> list[ReadItem]:
        identity = self.caller("scan")
        items = await self.bus.scan(prefix, after, limit)
        return [i for i in items if self.authority.allowed(identity, Operation.READ, i.key)]

    def watch(self, request: WatchRequest) -> AsyncIterator[Change]:
        identity = self.caller("watch")
        validate_prefix(request.prefix)
        self.authority.require(identity, Operation.WATCH, request.prefix, op="watch")
        return self.bus.watch(request)

    async def session_views(self, limit: int = DEFAULT_SESSIONS_LISTED) -> list[dict]:
        identity = self.caller("sessions")
        if self.authority.allowed(identity, Operation.ADMIN):
            return await self.bus.session_views(limit)
        # the caller's own sessions, and of their reads the keys it may read (chosen before the limit)
        return await self.bus.session_views(
            limit, show_session=lambda session: self.owners.visible(identity, session),
            show_key=lambda key: self.authority.allowed(identity, Operation.READ, key))

    def may_see_everything(self) -> bool:
        """Whether the call's identity has the admin grant (Unauthenticated without one)."""
        return self.authority.allowed(self.caller("sessions"), Operation.ADMIN)

    def may_read(self) -> Callable[[str], bool]:
        """Whether the call's identity may read a key, as a test to apply to many
        (Unauthenticated without an identity)."""
        identity = self.caller("read")
        return lambda key: self.authority.allowed(identity, Operation.READ, key)

    async def reset_every_session(self) -> int:
        self.require_admin("reset_every_session")
        return await self.bus.reset_every_session()

    def require_admin(self, op: str) -> Identity:
        identity = self.caller(op)
        self.authority.require(identity, Operation.ADMIN, op=op)
        return identity
