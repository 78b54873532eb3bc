"""The bus: the front door every client API is served from.

It routes keys to shards by the slot map, reads (so the owning shard records
each delivery), runs commits through the coordinator, and keeps the session
table (which shards each session has deliveries on, with their tokens).
Every transport — the embedded API, gRPC, HTTP — calls these methods and
nothing else, so all of them have the same semantics.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import replace

from oribus import tracing
from oribus.bus.coordinator import Coordinator
from oribus.bus.session_journal import SessionJournal
from oribus.bus.sessions import SessionLimits, SessionTable
from oribus.bus.watch import MergedWatch
from oribus.contract import BusService, CommitRequest, CommitResult, Entry, ReadResult, ShardService
from oribus.errors import InvalidRequest, OribusError, SessionExpired, ValueTooLarge
from oribus.messages import Change, ReadItem, ReadRequest, Scope, WatchRequest
from oribus.metrics import OP_SECONDS, SESSION_EXPIRED
from oribus.types import (
    DEFAULT_MAX_VALUE_BYTES,
    DEFAULT_SCAN_LIMIT,
    DEFAULT_SESSIONS_LISTED,
    MAX_KEYS_PER_REQUEST,
    MAX_SESSIONS_LISTED,
    MAX_VERSION,
    RESERVED_PREFIXES,
    SessionRef,
    validate_key,
)

log = logging.getLogger("oribus.bus")

FILTERED_SESSIONS_SCANNED = 10  # a filtered listing of sessions looks at this many times its limit per shard

_READ_SECONDS = OP_SECONDS.labels(op="read")
_COMMIT_SECONDS = OP_SECONDS.labels(op="commit")
_HISTORY_SECONDS = OP_SECONDS.labels(op="history")
_VIEW_SESSION = SessionRef("oribus", "view")  # peeks for operator views record nothing
# A shard that has not answered its stats call in this long is reported down.
SHARD_STATS_TIMEOUT_SECONDS = 2.0



def check_writable(key: str) -> None:
    """InvalidRequest if ``key`` is under a reserved prefix (reading such keys is allowed)."""
    for prefix in RESERVED_PREFIXES:
        if key.startswith(prefix):
            raise InvalidRequest(
                f"key {key!r} is under the reserved prefix {prefix!r}, which only the server "
                "writes (gateway metadata); choose another key",
                key=key, prefix=prefix,
            )


class Bus(BusService):
    """Routing, sessions and commits over a set of shards."""

    def __init__(
        self,
        shards: Mapping[int, ShardService],
        shard_for: Callable[[str], int],
        *,
        max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES,
        max_sessions: int = 1_000_000,
        session_journal: SessionJournal | None = None,
        session_limits: SessionLimits | None = None,  # caps on durable (HTTP) sessions
        clock: Callable[[], float] = time.time,  # stamps commits and read leases' deadlines (the simulation passes virtual time)
        monotonic: Callable[[], float] = time.monotonic,  # elapsed time of a commit that writes nothing
    ) -> None:
        self.clock = clock
        self.shards = shards
        self.shard_for = shard_for
        self.max_value_bytes = max_value_bytes
        self.sessions = SessionTable(max_sessions, session_journal, session_limits)
        self.coordinator = Coordinator(shards, shard_for, clock=clock, monotonic=monotonic)

    # ---- reads -----------------------------------------------------------------

    async def read(
        self,
        session: SessionRef,
        keys: list[str],
        record: bool = True,
        only_new: bool = False,
        *,
        detail: bool = False,
        durable_session: bool = False,
        client: str = "",
    ) -> ReadResult:
        """Read ``keys`` for ``session`` (timed for /metrics); each owning shard records the
        deliveries.

        ``detail``: items also carry who committed each version and when.
        ``only_new``: record only keys the session has not been given yet.
        ``durable_session``: the client sends no tokens (HTTP agents), so the
        session's tokens are journaled before this returns (``SessionJournal``). A read with
        ``only_new`` (a registration: ``oribus proxy`` records what an agent saw elsewhere,
        for a session whose own client never learns those tokens) is journaled too, so a
        restarted bus still validates them when the agent's client commits.
        ``client``: the address a durable session is used from (its per-client cap).
        """
        with _READ_SECONDS.time(), tracing.span("oribus.bus.read") as span:
            _check_session(session)
            if not isinstance(keys, list | tuple):
                raise InvalidRequest("keys must be a list of str")
            if len(keys) > MAX_KEYS_PER_REQUEST:
                raise InvalidRequest(f"at most {MAX_KEYS_PER_REQUEST} keys per read")
            by_shard: dict[int, list[str]] = {}
            for k in keys:
                validate_key(k)
                by_shard.setdefault(self.shard_for(k), []).append(k)
            if span is not None:
                span.set_attributes({"oribus.agent": session.agent, "oribus.session": session.session_id,
                                     "oribus.keys": len(keys), "oribus.shards": sorted(by_shard)})
            if not by_shard:
                return ReadResult([])
            if len(by_shard) == 1:
                (sid, ks), = by_shard.items()
                replies = [(sid, await self.shards[sid].read(ReadRequest(session, ks, record, detail, only_new)))]
            else:
                sids = list(by_shard)
                got = await asyncio.gather(
                    *(self.shards[s].read(ReadRequest(session, by_shard[s], record, detail, only_new))
                      for s in sids)
                )
                replies = list(zip(sids, got, strict=True))
            found: dict[str, ReadItem] = {}
            result = ReadResult([])
            for sid, reply in replies:
                for item in reply.items:
                    found[item.key] = item
                result.skipped.extend(reply.skipped)
                if record:
                    result.tokens[sid] = reply.token
                    result.seqs[sid] = reply.seq
                    if durable_session or only_new:
                        await self.sessions.observe_durably(session, sid, reply.token, client)
                    else:
                        self.sessions.observe(session, sid, reply.token)
            result.items = [found[k] for k in keys]
            return result

    # ---- commits -------------------------------------------------------------------

    async def commit(self, req: CommitRequest, *, durable_session: bool = False,
                     may_write_reserved: bool = False, client: str = "") -> CommitResult:
        """Commit ``req`` (see ``_commit``), timed for /metrics.

        ``may_write_reserved``: only for the server's own metadata writes (the
        gateway's S-Bus key creation and reset); no transport sets it.
        """
        with _COMMIT_SECONDS.time(), tracing.span("oribus.bus.commit") as span:
            if span is not None and isinstance(req.session, SessionRef):
                span.set_attributes({"oribus.agent": req.session.agent, "oribus.session": req.session.session_id,
                                     "oribus.commit_id": str(req.commit_id)})
            try:
                return await self._commit(req, durable_session=durable_session,
                                          may_write_reserved=may_write_reserved, client=client)
            except SessionExpired as e:
                SESSION_EXPIRED.inc()
                tracing.refused(span, e)
                raise
            except OribusError as e:
                tracing.refused(span, e)
                raise

    async def _commit(self, req: CommitRequest, *, durable_session: bool = False,
                      may_write_reserved: bool = False, client: str = "") -> CommitResult:
        """Validate the request's shape, merge the session's tokens, and commit.

        ``durable_session``: as for ``read`` — the tokens the commit leaves
        (its own writes become deliveries) are journaled before it returns, and
        a session marked as having lost tracked reads is refused once
        (``SessionTable.check_not_marked``).
        """
        _check_session(req.session)
        if (not req.commit_id or not isinstance(req.commit_id, str) or len(req.commit_id) > 128
                or not _utf8(req.commit_id)):
            raise InvalidRequest("commit_id must be a non-empty str of at most 128 characters of valid UTF-8")
        for k, raw in req.writes.items():
            validate_key(k)
            if not may_write_reserved:
                check_writable(k)
            if raw is not None and not isinstance(raw, bytes | bytearray):
                raise InvalidRequest(f"value of {k!r} must be encoded bytes")
            if raw is not None and len(raw) > self.max_value_bytes:
                raise ValueTooLarge(
                    f"value of {k!r} is {len(raw)} bytes, over the {self.max_value_bytes}-byte limit",
                    key=k, size=len(raw), limit=self.max_value_bytes,
                )
        for name, entries in (("rollback", req.rollback), ("expect", req.expect), ("read_set", req.read_set)):
            for k, v in entries.items():
                validate_key(k)
                if name == "rollback" and not may_write_reserved:
                    check_writable(k)
                if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= MAX_VERSION:
                    raise InvalidRequest(f"{name} version of {k!r} must be an int in 0..2**63-1", key=k)
        both = req.writes.keys() & req.rollback.keys()
        if both:
            raise InvalidRequest(f"keys both written and rolled back: {sorted(both)}")
        n = len(req.writes) + len(req.rollback) + len(req.expect) + len(req.read_set)
        if n > MAX_KEYS_PER_REQUEST:
            raise InvalidRequest(f"at most {MAX_KEYS_PER_REQUEST} keys per commit")
        if durable_session:
            await self.sessions.check_not_marked(req.session, client)
        if req.scope is Scope.SESSION:
            # the bus's own record of where the session read, merged with the client's
            known = self.sessions.tokens(req.session)
            for sid, tok in known.items():
                theirs = req.tokens.get(sid)
                if theirs is not None and tuple(theirs) != tuple(tok):
                    raise SessionExpired(
                        f"session {req.session} saw shard {sid} restart or expire it; "
                        "its deliveries there are lost — reset the session and read again",
                        shard=sid,
                    )
                req.tokens.setdefault(sid, tok)
            if not known and not req.complete_tokens:
                # Nothing tells this bus where the session read (another replica served it,
                # or this bus restarted, and the client does not track tokens): validate on
                # every shard rather than skip any part of the read set.
                req.broadcast = True
        if not req.committed_at:
            req.committed_at = self.clock()
        result = await self.coordinator.commit(req)
        for sid, tok in result.tokens.items():
            if durable_session:
                await self.sessions.observe_durably(req.session, sid, tok, client)
            else:
                self.sessions.observe(req.session, sid, tok)
        return result

    # ---- the rest ------------------------------------------------------------------

    async def history(self, key: str, limit: int | None = None) -> list[Entry]:
        with _HISTORY_SECONDS.time(), tracing.span("oribus.bus.history") as span:
            if span is not None and isinstance(key, str):
                span.set_attribute("oribus.key", key)
            return await self._history(key, limit)

    async def _history(self, key: str, limit: int | None = None) -> list[Entry]:
        validate_key(key)
        if limit is not None and (not isinstance(limit, int) or limit < 1):
            raise InvalidRequest("limit must be a positive int")
        return await self.shards[self.shard_for(key)].history(key, limit)

    async def forget(self, session: SessionRef, keys: list[str], *, caller_owns: bool = True) -> bool:
        """Drop the session's deliveries of ``keys``.

        ``caller_owns=False``: the caller did not prove it owns this durable
        session, so the session is marked and its next commit fails closed
        (specs/http.md). Returns whether it was marked.
        """
        _check_session(session)
        if not isinstance(keys, list | tuple):
            raise InvalidRequest("keys must be a list of str")
        by_shard: dict[int, list[str]] = {}
        for k in keys:
            validate_key(k)
            by_shard.setdefault(self.shard_for(k), []).append(k)
        if caller_owns or not by_shard:
            await asyncio.gather(*(self.shards[s].forget(session, ks) for s, ks in by_shard.items()))
            return False
        # Not the owner: the session's records go on those shards, so whichever bus holds its
        # tokens (another replica included) refuses its next commit (SessionExpired).
        await asyncio.gather(*(self.shards[s].drop(session) for s in by_shard))
        return await self.sessions.mark_lost_reads(
            session, "some of its reads were forgotten by a caller that did not present its session_token")

    async def reset(self, session: SessionRef, *, caller_owns: bool = True) -> bool:
        """Drop every delivery of the session on every shard, and its tokens.

        ``caller_owns=False``: as for ``forget`` — the session's records are
        dropped on the shards (a bus presenting its tokens gets SessionExpired) and
        it is marked here, so its next commit fails closed on any bus. Returns
        whether it was marked here.
        """
        _check_session(session)
        sids = list(self.shards)
        if not caller_owns:
            # The session's records go on every shard, so whichever bus holds its tokens
            # (another replica, which this bus cannot mark) refuses its next commit too.
            await asyncio.gather(*(self.shards[s].drop(session) for s in sids))
            return await self.sessions.reset(session, caller_owns=False)
        now = await asyncio.gather(*(self.shards[s].reset(session) for s in sids))
        return await self.sessions.reset(session, dict(zip(sids, now, strict=True)))

    async def open_session(self, session: SessionRef, client: str = "") -> str | None:
        """A ``session_token`` proving ownership of a durable session nobody uses yet, else
        None (``SessionTable.open``)."""
        _check_session(session)
        return await self.sessions.open(session, client)

    async def reset_every_session(self) -> int:
        """Empty every session's read log on every shard and drop every mark (S-Bus
        ``/admin/reset``). Returns how many (session, shard) read logs had entries."""
        # One call per shard, not one per session: a shard holds up to 100,000 sessions,
        # more than any listing call returns. Records and incarnations stay, so the tokens
        # the bus keeps still match and need no journal write.
        emptied = await asyncio.gather(*(s.reset_every_session() for s in self.shards.values()))
        await self.sessions.clear_marks()
        return sum(emptied)

    def watch(self, request: WatchRequest) -> AsyncIterator[Change]:
        """Changes of keys under ``request.prefix`` on every shard, merged; each key's in
        version order.

        ``request.from_version``: first replay every kept version after it of every key
        (None: live changes only). ``after`` (key -> last version seen) and ``since``
        serve resuming watchers (see ``oribus.messages.WatchRequest``); each shard is
        sent the part of ``after`` it owns. In-process shards register the watch before
        this returns, so every change made visible afterwards is streamed. A watch
        records no delivery: it belongs to no session.
        """
        after_by_shard: dict[int, dict[str, int]] = {}
        for k, v in request.after.items():
            after_by_shard.setdefault(self.shard_for(k), {})[k] = v
        streams: list[AsyncIterator[Change]] = []
        try:
            for sid, shard in self.shards.items():
                streams.append(shard.watch(replace(request, after=after_by_shard.get(sid, {}))))
        except BaseException:
            for s in streams:
                close = getattr(s, "close", None)  # in-process watchers detach at once
                if close is not None:
                    close()
            raise
        return streams[0] if len(streams) == 1 else MergedWatch(streams)

    async def scan(self, prefix: str = "", after: str = "", limit: int = DEFAULT_SCAN_LIMIT) -> list[ReadItem]:
        """Live keys under ``prefix`` after ``after``, in key order, from every shard; no delivery."""
        if not isinstance(prefix, str) or not isinstance(after, str):
            raise InvalidRequest("prefix and after must be str")
        if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= MAX_KEYS_PER_REQUEST:
            raise InvalidRequest(f"limit must be an int in 1..{MAX_KEYS_PER_REQUEST}")
        pages = await asyncio.gather(*(s.scan(prefix, after, limit) for s in self.shards.values()))
        return heapq.nsmallest(limit, (i for page in pages for i in page), key=lambda i: i.key)

    async def session_views(self, limit: int = DEFAULT_SESSIONS_LISTED, *,
                            show_session: Callable[[SessionRef], bool] | None = None,
                            show_key: Callable[[str], bool] | None = None) -> list[dict]:
        """The most recently active sessions on every shard with each delivered key marked
        current or stale (for operators; a peek that records nothing).

        ``show_session`` / ``show_key`` (the guard of ``--auth``, for a caller without the admin grant):
        the sessions and the delivered keys to show; the others are left out before the
        ``limit`` most recent are chosen, among the ``FILTERED_SESSIONS_SCANNED`` times
        ``limit`` most recent of each shard (at most ``MAX_SESSIONS_LISTED``: a caller's own
        sessions are found among others' without each poll of a dashboard copying every
        shard's whole table), and the current version of a key left out is not read."""
        asked = limit if show_session is None else min(MAX_SESSIONS_LISTED, limit * FILTERED_SESSIONS_SCANNED)
        per_shard = await asyncio.gather(*(s.sessions(asked) for s in self.shards.values()))
        merged: dict[SessionRef, dict] = {}
        for views in per_shard:
            for session, entries, idle in views:
                if show_session is not None and not show_session(SessionRef(*session)):
                    continue
                if show_key is not None:
                    entries = {k: v for k, v in entries.items() if show_key(k)}
                view = merged.setdefault(session, {"reads": {}, "idle": idle})
                view["reads"].update(entries)
                view["idle"] = min(view["idle"], idle)
        chosen = sorted(merged.items(), key=lambda kv: kv[1]["idle"])[:limit]
        keys = sorted({k for _, v in chosen for k in v["reads"]})
        current: dict[str, int] = {}
        for i in range(0, len(keys), MAX_KEYS_PER_REQUEST):
            got = await self.read(_VIEW_SESSION, keys[i:i + MAX_KEYS_PER_REQUEST], record=False)
            current.update((item.key, item.version) for item in got.items)
        return [
            {
                "agent": session[0],
                "session": session[1],
                "idle_seconds": round(view["idle"], 3),
                "reads": [
                    {"key": k, "version": v, "current": current.get(k, 0), "stale": current.get(k, 0) != v}
                    for k, v in sorted(view["reads"].items())
                ],
            }
            for session, view in chosen
        ]

    def set_validation(self, enabled: bool) -> None:
        """Switch ORI validation on or off on every shard (S-Bus ``/admin/config``).

        Off accepts stale commits: for baselines in experiments only. Possible
        only for shards in this process (a shard server is configured at start).
        """
        cores = []
        for sid, shard in self.shards.items():
            if not hasattr(shard, "core"):
                raise InvalidRequest(
                    f"validation can only be switched at run time for in-process shards; shard {sid} "
                    "is a server (start it with unsafe_disable_validation instead)"
                )
            cores.append(shard.core)
        for core in cores:
            core.unsafe_disable_validation = not enabled
        log.warning("ORI validation switched %s on every shard", "ON" if enabled else "OFF (unsafe)")

    @property
    def validation_enabled(self) -> bool:
        return not any(getattr(getattr(s, "core", None), "unsafe_disable_validation", False)
                       for s in self.shards.values())

    async def shard_stats(self, timeout: float = SHARD_STATS_TIMEOUT_SECONDS) -> dict[int, dict]:
        """Every shard's stats with ``up: True``, or ``{"shard", "up": False, "error"}`` for one
        that failed or did not answer within ``timeout`` seconds.

        Each shard is asked on its own, concurrently: one shard that is down or hung marks
        only itself down, and operators still see the others.
        """
        ids = sorted(self.shards)
        answers = await asyncio.gather(
            *(asyncio.wait_for(self.shards[s].stats(), timeout) for s in ids), return_exceptions=True
        )
        out: dict[int, dict] = {}
        for shard_id, answer in zip(ids, answers, strict=True):
            if isinstance(answer, TimeoutError):
                out[shard_id] = {"shard": shard_id, "up": False, "error": f"no answer within {timeout:g} s"}
            elif isinstance(answer, Exception):
                out[shard_id] = {"shard": shard_id, "up": False, "error": f"{type(answer).__name__}: {answer}"}
            elif isinstance(answer, BaseException):
                raise answer  # cancellation and the like are not "shard down"
            else:
                out[shard_id] = {**answer, "shard": shard_id, "up": True}
        return out

    async def stats(self) -> dict:
        """The bus's counters and every shard's stats; a shard that does not answer is marked
        ``up: False`` with the error and listed under ``shards_down`` (see ``shard_stats``)."""
        shards = await self.shard_stats()
        return {
            "shards": list(shards.values()),
            "shards_down": [sid for sid, st in shards.items() if not st["up"]],
            "sessions": len(self.sessions),
            "durable_sessions": self.sessions.durable_sessions,
            "coordinator": dict(self.coordinator.counters),
        }


def _check_session(session: SessionRef) -> None:
    if (
        not isinstance(session, tuple)
        or len(session) != 2
        or not all(isinstance(p, str) and 0 < len(p) <= 256 and _utf8(p) for p in session)
    ):
        raise InvalidRequest("a session is (agent, session_id): two non-empty str of at most 256 "
                             "characters of valid UTF-8")


def _utf8(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: no WAL record could hold it
        return False
    return True


