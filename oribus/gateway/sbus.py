"""S-Bus compatible routes: unmodified S-Bus agents and harnesses work against oribus.

S-Bus calls a key a "shard": its routes (``/shard/{key}``, ``/shards``) and
fields (``shards``, ``total_shards``, ``shard_id``, ``shards_used``,
``ShardNotFound``) keep S-Bus's names, for compatibility, but everything in
this module is named after what it handles, a key (``create_key``,
``read_key``, ``list_keys``). Where this module says shard, it means what it
means everywhere else in oribus: a partition of the keys, served by a shard
server.

Mapping:

* session: agent ``A`` is the oribus session ``(A, "sbus")``. Its GETs are
  deliveries; its commits are checked against everything it read (the full
  ORI rule: logged and explicit entries both checked; its own writes are not
  stale to it; an agent that never read is checked against nothing, never
  against less than it read). The session is durable (journaled by the bus).
* versions: S-Bus numbers a key from 0 at creation; oribus from 1 (0 means
  absent) and never reuses a version (a key deleted and created again
  continues from its tombstone, so no earlier read can match again). The
  creation records the key's *base* — its oribus version just before the
  creation (0 for a new key, the tombstone's version otherwise) — and every
  version crossing this API is shifted by it: S-Bus ``v`` is oribus
  ``v + base + 1``. So a key created again (after ``/admin/reset`` or a delete
  through ``/v1``) starts at 0, as in S-Bus.
* content: the key's value (a string for S-Bus clients; other JSON values
  written by SDK agents are returned as they are).
* metadata S-Bus returns but oribus does not keep per version — ``goal_tag``,
  ``created_at`` and ``id`` (sha256 of the initial content, as in S-Bus) — is
  written atomically with the key at creation under ``.sbus/<key>`` (a reserved
  prefix: only this module writes there, ``bus.RESERVED_PREFIXES``), with the
  base. It is read with each request rather than cached, so every bus
  replica numbers a re-created key alike; a malformed record (written by an
  older version, or damaged) is read as missing fields, never as an error. ``owner`` is null
  between commits (as in S-Bus, whose owner token is only held inside a
  commit); ``last_writer`` names the agent of the current version.
  ``attempt_count`` / ``conflict_count`` count this gateway's commits since
  it started.
* errors: ``{"error": code, "detail": message, ...}`` with S-Bus's codes and
  statuses (409 VersionMismatch / CrossShardStale / TokenConflict, 404
  ShardNotFound, 413 DeltaTooLarge, 410 SessionExpired, 409
  ShardAlreadyExists); a refused commit also lists every offending key under
  ``stale`` (S-Bus reports only the first). A code that stands for an oribus
  error, and any other oribus error a route raises, takes its status from the
  one table (``gateway/errors.py``; ``SBUS_ERRORS``). A 410 starts the agent's read set
  afresh, as an expired S-Bus session does: re-read what the work depends on.
* ``GET /shards`` lists key strings, as S-Bus does.
* admin routes exist only with ``admin`` enabled; otherwise every one is 403.
  ``/admin/reset`` makes the visible state S-Bus's: every key absent (the
  next creation starts at version 0) and every session's read log empty.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
import uuid
from collections import OrderedDict
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from aiohttp import web

from oribus.bus.bus import RESERVED_PREFIXES, check_writable
from oribus.contract import CommitRequest
from oribus.errors import (
    Aborted,
    Conflict,
    InvalidRequest,
    OribusError,
    SessionExpired,
    ValueTooLarge,
)
from oribus.gateway.errors import LOG_FIELDS, RequestError, http_status, json_response, status_of
from oribus.types import (
    DEFAULT_HISTORY_LIMIT,
    DEFAULT_SCAN_LIMIT,
    MAX_KEYS_PER_REQUEST,
    MAX_SESSIONS_LISTED,
    MAX_VERSION,
    SessionRef,
    decode_value,
    encode_value,
    validate_key,
)

if TYPE_CHECKING:
    from oribus.gateway.app import HttpGateway

SESSION_ID = "sbus"
META_PREFIX = ".sbus/"
LIMIT_REFRESH_SECONDS = 60.0  # how long a shard's history count, as its stats said, is used
LIMIT_ASK_TIMEOUT = 2.0  # seconds a shard has to answer that
assert META_PREFIX in RESERVED_PREFIXES
_SYSTEM = SessionRef("system", "sbus-create")  # creates keys; reads nothing, so nothing to validate
_PEEK = SessionRef("oribus", "sbus-peek")  # peeks record nothing
_ADMIN = SessionRef("admin", "sbus-admin")


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


# Every code S-Bus routes refuse with, and what it stands for. A code for one of oribus's
# errors answers with that error's status from the one table (gateway/errors.py), so an
# S-Bus route and /v1 never disagree on it; the others are refusals oribus has no error for.
SBUS_ERRORS: dict[str, type[OribusError] | int] = {
    "VersionMismatch": Conflict,  # the written key is not at the expected version
    "CrossShardStale": Conflict,  # another key the agent read has changed since
    "TokenConflict": Conflict,  # a key locked by a concurrent commit, or the commit aborted
    "ShardAlreadyExists": Conflict,  # POST /shard of a key that exists
    "SessionExpired": SessionExpired,
    "DeltaTooLarge": ValueTooLarge,
    "InvalidRequest": InvalidRequest,
    "ShardNotFound": 404,  # the key does not exist
    "VersionNotFound": 404,  # rollback to a version the key does not keep
    "Forbidden": 403,  # an admin route without --admin
}


def sbus_status(code: str) -> int:
    """The status S-Bus answers ``code`` with (``SBUS_ERRORS``)."""
    meaning = SBUS_ERRORS[code]
    return meaning if isinstance(meaning, int) else status_of(meaning)


class SbusError(Exception):
    """A refusal in S-Bus's shape: ``{"error": code, "detail": message, **extra}``.

    ``status`` defaults to the code's (``SBUS_ERRORS``).
    """

    def __init__(self, code: str, detail: str, *, status: int | None = None, **extra: Any) -> None:
        super().__init__(detail)
        self.code, self.detail, self.extra = code, detail, extra
        self.status = sbus_status(code) if status is None else status

    @classmethod
    def of(cls, e: OribusError) -> SbusError:
        """An oribus error that no route turned into one of S-Bus's: its status from the one
        table, its code as S-Bus names it (a too large value is S-Bus's DeltaTooLarge); a
        refused request's details (the key or field) at the top level, as S-Bus's own
        refusals carry theirs."""
        error = cls("DeltaTooLarge" if isinstance(e, ValueTooLarge) else e.code, e.message, status=http_status(e))
        if isinstance(e, InvalidRequest):
            error.extra = dict(e.details)
        return error

    def response(self) -> web.Response:
        return json_response({"error": self.code, "detail": self.detail, **self.extra}, self.status)


def _malformed(detail: str) -> SbusError:
    """A body S-Bus cannot deserialize (a missing field, a wrong type): S-Bus's server (axum)
    answers 422 for it, where oribus's InvalidRequest is 400."""
    return SbusError("InvalidRequest", detail, status=422)


def _field(body: dict, *names: str, kind: type | tuple[type, ...], required: bool = True, default: Any = None) -> Any:
    for name in names:
        if name in body:
            v = body[name]
            if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
                want = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
                raise _malformed(f"field {name!r} must be {want}, not {type(v).__name__}")
            return v
    if required:
        raise _malformed(f"missing field {names[0]!r}")
    return default


def _agent(value: Any, required: bool = True) -> str:
    if value is None or value == "":
        if required:
            raise _malformed("missing field 'agent_id'")
        return ""
    if not isinstance(value, str) or len(value) > 256 or any("\ud800" <= c <= "\udfff" for c in value):
        raise _malformed("agent_id must be a UTF-8 string of at most 256 characters")
    return value


def _key(value: Any) -> str:
    try:
        return validate_key(value)
    except InvalidRequest as e:
        raise SbusError("InvalidRequest", e.message) from None


def _clean_meta(raw: Any) -> dict:
    """The well-formed fields of a metadata record; anything else is left out.

    The record is written only by ``create_key``, but one written by an older
    version or damaged must not fail the key's reads: a missing field falls
    back to its default (no goal tag, the content's hash, base 0).
    """
    if not isinstance(raw, dict):
        return {}
    meta: dict[str, Any] = {}
    for name in ("goal_tag", "id"):
        if isinstance(raw.get(name), str):
            meta[name] = raw[name]
    created = raw.get("created_at")
    if isinstance(created, int | float) and not isinstance(created, bool) and math.isfinite(created) \
            and 0 < created < 253402300800:  # before year 10000: iso() can render it
        meta["created_at"] = float(created)
    base = raw.get("base")
    if isinstance(base, int) and not isinstance(base, bool) and 0 <= base < (1 << 62):
        meta["base"] = base
    return meta


def _version(value: Any, name: str) -> int:
    # below MAX_VERSION: the key's oribus version is at least one more
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < MAX_VERSION:
        raise _malformed(f"{name} must be an integer in 0..2**63-2")
    return value


class SbusRoutes:
    def __init__(self, gateway: HttpGateway) -> None:
        self.gw = gateway
        self.bus = gateway.bus
        self._per_key: OrderedDict[str, list[int]] = OrderedDict()  # key -> [attempts, conflicts]
        self._limits: dict[int, tuple[int, float]] = {}  # shard -> (its history count, when asked)
        # named as the /stats fields they feed (S-Bus's CrossShardStale: another key read stale)
        self.counters = {"commits": 0, "conflicts": 0, "cross_shard_stale": 0, "session_expired": 0}

    def register(self, router: web.UrlDispatcher) -> None:
        r = router
        r.add_post("/shard", self._wrap(self.create_key))
        r.add_get("/shard/{key:.+}", self._wrap(self.read_key))
        r.add_get("/shards", self._wrap(self.list_keys))
        r.add_post("/commit", self._wrap(self.commit))
        r.add_post("/commit/v2", self._wrap(self.commit))
        r.add_post("/rollback", self._wrap(self.rollback))
        r.add_post("/session", self._wrap(self.session))
        r.add_post("/delivery_log/register", self._wrap(self.register_deliveries))
        r.add_get("/stats", self._wrap(self.stats))
        r.add_post("/admin/reset", self._wrap(self._admin(self.admin_reset)))
        r.add_get("/admin/config", self._wrap(self._admin(self.admin_get_config)))
        r.add_post("/admin/config", self._wrap(self._admin(self.admin_set_config)))
        r.add_get("/admin/delivery-log", self._wrap(self._admin(self.admin_delivery_log)))
        r.add_get("/admin/health", self._wrap(self._admin(self.admin_health)))

    def _wrap(self, handler: Any) -> Any:
        async def route(request: web.Request) -> web.StreamResponse:
            try:
                return await handler(request)
            except SbusError as e:
                return e.response()
            except OribusError as e:
                return SbusError.of(e).response()

        route.__name__ = handler.__name__
        return route

    def _admin(self, handler: Any) -> Any:
        async def guarded(request: web.Request) -> web.StreamResponse:
            if not self.gw.config.admin:
                raise SbusError("Forbidden", "admin endpoints are disabled (start the server with --admin)")
            return await handler(request)

        guarded.__name__ = handler.__name__
        return guarded

    async def _body(self, request: web.Request) -> dict:
        try:
            return await self.gw.body(request)
        except RequestError as e:
            raise SbusError(e.code, e.message, status=e.status) from None

    # ---- a key as S-Bus shows it --------------------------------------------------------

    async def _metas(self, keys: list[str]) -> dict[str, dict]:
        """Each key's metadata record (``_clean_meta``), ``{}`` for a key without one."""
        keys = list(dict.fromkeys(keys))
        got = await self.bus.read(_PEEK, [META_PREFIX + k for k in keys], record=False)
        out = {}
        for key, item in zip(keys, got.items, strict=True):
            try:
                raw = decode_value(item.value)
            except Exception:  # noqa: BLE001 - an undecodable record reads as none
                raw = None
            out[key] = _clean_meta(raw)
        return out

    async def _meta_of(self, key: str) -> dict:
        return (await self._metas([key]))[key]

    def _counts(self, key: str) -> list[int]:
        c = self._per_key.get(key)
        if c is None:
            c = self._per_key[key] = [0, 0]
            if len(self._per_key) > 100_000:
                self._per_key.popitem(last=False)
        return c

    async def history_limit(self, key: str) -> int:
        """How many versions the shard of ``key`` keeps: the gateway's own figure when its bus
        holds the shards (``oribus up``), else the shard's as its stats say (asked at most once a
        minute: a shard restarted with another ``--history-versions`` is seen within that), or
        the default while the shard does not answer."""
        if self.gw.config.history_limit is not None:
            return self.gw.config.history_limit
        shard = self.bus.shard_for(key)
        now = time.monotonic()
        known = self._limits.get(shard)
        if known is not None and now - known[1] < LIMIT_REFRESH_SECONDS:
            return known[0]
        try:
            stats = await asyncio.wait_for(self.bus.shards[shard].stats(), LIMIT_ASK_TIMEOUT)
            limit = int(stats["history"]["limit"])
        except (OribusError, TimeoutError, KeyError, TypeError, ValueError):
            return known[0] if known is not None else DEFAULT_HISTORY_LIMIT
        self._limits[shard] = (limit, now)
        return limit

    def _key_object(self, key: str, item: Any, meta: dict, history_limit: int) -> dict:
        """The JSON object S-Bus returns for a key, its versions in S-Bus numbering."""
        attempts, conflicts = self._per_key.get(key, (0, 0))
        updated = item.committed_at or meta.get("created_at") or 0.0
        version = item.version - meta.get("base", 0) - 1
        return {
            "key": key,
            "id": meta.get("id") or hashlib.sha256(key.encode()).hexdigest(),
            "version": version,
            "content": decode_value(item.value),
            "owner": None,
            "goal_tag": meta.get("goal_tag", ""),
            "attempt_count": attempts,
            "conflict_count": conflicts,
            "delta_log_depth": min(version, history_limit - 1),
            "created_at": iso(meta.get("created_at") or updated),
            "updated_at": iso(updated),
            "last_writer": item.agent or None,
        }

    # ---- routes ------------------------------------------------------------------------

    async def create_key(self, request: web.Request) -> web.Response:
        """``POST /shard``: create a key with its first value and S-Bus metadata (409 if it exists)."""
        body = await self._body(request)
        key = _key(_field(body, "key", kind=str))
        try:
            check_writable(key)  # the creation below may write reserved keys: refuse them here
        except InvalidRequest as e:
            raise SbusError("InvalidRequest", e.message, **e.details) from None
        content = _field(body, "content", kind=str)
        goal_tag = _field(body, "goal_tag", kind=str, required=False, default="")
        self._check_delta(key, content)
        current = (await self.bus.read(_PEEK, [key], record=False)).items[0]
        if current.value is not None:
            raise SbusError("ShardAlreadyExists", f"shard already exists: key={key}", key=key)
        now = time.time()
        meta = {"goal_tag": goal_tag, "created_at": now, "id": hashlib.sha256(content.encode()).hexdigest(),
                "base": current.version}  # S-Bus numbering restarts at 0 from here
        max_bytes = self.bus.max_value_bytes
        req = CommitRequest(
            session=_SYSTEM,
            commit_id=uuid.uuid4().hex,
            writes={key: encode_value(content, max_bytes), META_PREFIX + key: encode_value(meta, max_bytes)},
            expect={key: current.version},  # still deleted/absent at the commit point
            committed_at=now,
        )
        request[LOG_FIELDS]["commit_id"] = req.commit_id
        try:
            # earlier creates are not reads of this one; the metadata key is reserved
            result = await self.gw.commit_unread(req, may_write_reserved=True)
        except Conflict as e:
            if any(s.key == key for s in e.stale):
                raise SbusError("ShardAlreadyExists", f"shard already exists: key={key}", key=key) from None
            raise
        item = type(current)(key, req.writes[key], result.versions[key], "system", now)
        return json_response(self._key_object(key, item, meta, await self.history_limit(key)), 201)

    async def read_key(self, request: web.Request) -> web.Response:
        """``GET /shard/{key}``: the key's object; with ``agent_id``, a read recorded for that agent."""
        key = _key(request.match_info["key"])
        agent = _agent(request.query.get("agent_id"), required=False)
        request[LOG_FIELDS]["agent"] = agent
        if agent:
            read = self.bus.read(SessionRef(agent, SESSION_ID), [key], record=True, detail=True, durable_session=True,
                                 client=request.remote or "")
        else:
            read = self.bus.read(_PEEK, [key], record=False, detail=True)
        got, meta = await asyncio.gather(read, self._meta_of(key))
        item = got.items[0]
        if item.value is None:
            raise SbusError("ShardNotFound", f"shard not found: key={key}", key=key)
        return json_response(self._key_object(key, item, meta, await self.history_limit(key)))

    async def list_keys(self, request: web.Request) -> web.Response:
        """``GET /shards``: every live key (S-Bus returns key strings; ``GET /shard/{key}`` gives the
        object)."""
        keys: list[str] = []
        after = ""
        while True:
            page = await self.bus.scan("", after, DEFAULT_SCAN_LIMIT)
            keys.extend(i.key for i in page if not i.key.startswith(RESERVED_PREFIXES))
            if len(page) < DEFAULT_SCAN_LIMIT:
                break
            after = page[-1].key
        return json_response({"shards": keys, "count": len(keys)})

    def _check_delta(self, key: str, delta: str) -> None:
        limit = self.gw.config.sbus_max_delta
        if limit and len(delta) > limit:
            raise SbusError("DeltaTooLarge", f"delta too large: key={key} len={len(delta)} max={limit}",
                            key=key, len=len(delta), max=limit)

    async def commit(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        key = _key(_field(body, "key", kind=str))
        expected = _version(_field(body, "expected_version", "expected_ver", kind=int), "expected_version")
        delta = _field(body, "delta", "content", kind=str)
        agent = _agent(body.get("agent_id"))
        _field(body, "rationale", kind=(str, type(None)), required=False)
        raw_rs = _field(body, "read_set", kind=(list, type(None)), required=False) or []
        claimed: dict[str, int] = {}  # key -> S-Bus version at read
        for entry in raw_rs:
            if not isinstance(entry, dict):
                raise _malformed("read_set entries must be {key, version_at_read}")
            k = _key(_field(entry, "key", kind=str))
            v = _version(_field(entry, "version_at_read", kind=int), "version_at_read")
            if claimed.get(k, v) != v:  # two versions of one key: one of them is stale
                raise SbusError("CrossShardStale", f"read_set lists {k!r} at two versions",
                                key=k, version_at_read=v)
            claimed[k] = v
        self._check_delta(key, delta)
        request[LOG_FIELDS]["agent"] = agent
        value = encode_value(delta, self.bus.max_value_bytes)  # too large: refused, not an attempt
        # S-Bus commits only to existing keys. A deleted key's tombstone has a version too, so
        # the expected version alone could bring it back: look first. (If it is deleted after
        # this look, its version moves on and the expectation refuses the commit.)
        peek, metas = await asyncio.gather(self.bus.read(_PEEK, [key], record=False),
                                           self._metas([key, *claimed]))
        if peek.items[0].value is None:
            raise SbusError("ShardNotFound", f"shard not found: key={key}", key=key)
        bases = {k: m.get("base", 0) for k, m in metas.items()}
        counts = self._counts(key)
        counts[0] += 1
        req = CommitRequest(
            session=SessionRef(agent, SESSION_ID),
            commit_id=uuid.uuid4().hex,
            writes={key: value},
            expect={key: expected + bases[key] + 1},
            read_set={k: v + bases[k] + 1 for k, v in claimed.items()},
            complete_tokens=True,
        )
        request[LOG_FIELDS]["commit_id"] = req.commit_id
        try:
            result = await self.bus.commit(req, durable_session=True, client=request.remote or "")
        except Conflict as e:
            counts[1] += 1
            self.counters["conflicts"] += 1
            raise await self._refusal(key, e, bases) from None
        except SessionExpired as e:
            self.counters["session_expired"] += 1
            await self.bus.reset(SessionRef(agent, SESSION_ID))  # as in S-Bus: the next reads start afresh
            raise SbusError("SessionExpired", f"session expired for agent '{agent}': {e.message}",
                            agent_id=agent) from None
        self.counters["commits"] += 1
        return json_response({"new_version": result.versions[key] - bases[key] - 1,
                              "shard_id": metas[key].get("id") or hashlib.sha256(key.encode()).hexdigest()})

    async def _refusal(self, key: str, e: Conflict, bases: dict[str, int]) -> SbusError:
        """S-Bus's error for a refused commit: the written key first, then the others.

        Versions are shown in S-Bus numbering (``bases``: keys whose base is known;
        the others' are read). A read of the key from before it was created again
        is shown as version -1.
        """
        missing = [s.key for s in e.stale if s.key not in bases]
        if missing:
            bases = {**bases, **{k: m.get("base", 0) for k, m in (await self._metas(missing)).items()}}

        def sbus_version(k: str, v: int) -> int:
            return max(-1, v - bases[k] - 1)

        stale = [
            {"key": s.key, "version_at_read": None if s.version is None else sbus_version(s.key, s.version),
             "current_version": sbus_version(s.key, s.current), "reason": s.reason}
            for s in e.stale
        ]
        by_key = {(s.key, s.reason): row for s, row in zip(e.stale, stale, strict=True)}
        mine = [s for s in e.stale if s.key == key]
        others = [s for s in e.stale if s.key != key]
        for s in mine + others:
            if s.current == 0:
                return SbusError("ShardNotFound", f"shard not found: key={s.key}", key=s.key, stale=stale)
        if mine and mine[0].reason in ("expected_version", "stale_read"):
            row = by_key[(key, mine[0].reason)]
            return SbusError(
                "VersionMismatch",
                f"version mismatch on key={key}: expected={row['version_at_read']} "
                f"found={row['current_version']}",
                key=key, expected_version=row["version_at_read"],
                current_version=row["current_version"], stale=stale,
            )
        stale_reads = [s for s in others if s.reason == "stale_read"]
        if stale_reads:
            row = by_key[(stale_reads[0].key, "stale_read")]
            self.counters["cross_shard_stale"] += 1
            return SbusError(
                "CrossShardStale",
                f"cross-shard stale read: key={row['key']} version_at_read={row['version_at_read']} "
                f"current_version={row['current_version']}",
                key=row["key"], version_at_read=row["version_at_read"],
                current_version=row["current_version"], stale=stale,
            )
        if isinstance(e, Aborted) and not e.stale:
            return SbusError("TokenConflict", f"commit aborted: {e.message}", key=key, stale=stale)
        s = e.stale[0]
        return SbusError("TokenConflict",
                         f"token conflict on key={s.key}: another commit holds it", key=s.key, stale=stale)

    async def rollback(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        key = _key(_field(body, "key", kind=str))
        target = _version(_field(body, "target_version", kind=int), "target_version")
        agent = _agent(body.get("agent_id"))
        request[LOG_FIELDS]["agent"] = agent
        peek, meta = await asyncio.gather(self.bus.read(_PEEK, [key], record=False), self._meta_of(key))
        if peek.items[0].value is None:
            raise SbusError("ShardNotFound", f"shard not found: key={key}", key=key)
        base = meta.get("base", 0)
        req = CommitRequest(session=SessionRef(agent, SESSION_ID), commit_id=uuid.uuid4().hex,
                            rollback={key: target + base + 1}, complete_tokens=True)
        request[LOG_FIELDS]["commit_id"] = req.commit_id
        try:
            await self.bus.commit(req, durable_session=True, client=request.remote or "")
        except InvalidRequest as e:
            if "version" in e.details:
                raise SbusError("VersionNotFound", e.message, key=key, target_version=target) from None
            raise
        except Conflict as e:
            raise await self._refusal(key, e, {key: base}) from None
        item = (await self.bus.read(_PEEK, [key], record=False, detail=True)).items[0]
        return json_response(self._key_object(key, item, meta, await self.history_limit(key)))

    async def session(self, request: web.Request) -> web.Response:
        """Start the agent's session afresh (as S-Bus), with oribus's ownership rule.

        A session nobody uses yet gets a ``session_token``; a later ``POST /session``
        with it clears the agent's reads as S-Bus does. Without it (anyone can name
        any agent) the reads are dropped and the session is marked, so its next
        commit is refused with 410 SessionExpired rather than passing on reads it
        no longer has (``next_commit_refused``).
        """
        body = await self._body(request)
        agent = _agent(body.get("agent_id"))
        token = _field(body, "session_token", kind=(str, type(None)), required=False)
        session = SessionRef(agent, SESSION_ID)
        owns = self.bus.sessions.is_owner(session, token)
        marked = await self.bus.reset(session, caller_owns=owns)
        if not owns:
            token = await self.bus.open_session(session, request.remote or "")
        return json_response({"agent_id": agent, "status": "created", "session_token": token,
                              "next_commit_refused": marked})

    async def register_deliveries(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        agent = _agent(body.get("agent_id"))
        if agent == "":
            raise SbusError("InvalidRequest", "agent_id is empty")
        used = _field(body, "shards_used", kind=list)
        keys = [_key(k) for k in used]
        if not keys:
            return json_response({"ok": True, "registered": 0, "skipped_existing": [], "skipped_no_shard": []})
        got = await self.bus.read(SessionRef(agent, SESSION_ID), list(dict.fromkeys(keys)), record=True,
                                  only_new=True, durable_session=True, client=request.remote or "")
        skipped = set(got.skipped)
        missing = [i.key for i in got.items if i.value is None and i.key not in skipped]
        registered = [i.key for i in got.items if i.value is not None and i.key not in skipped]
        return json_response({"ok": True, "registered": len(registered),
                              "skipped_existing": sorted(skipped), "skipped_no_shard": missing})

    async def _totals(self) -> dict:
        """Totals over the shards that answer; each shard is marked up, or down with its error."""
        shards = await self.gw.shard_health()
        agents = deliveries = keys = 0
        status: list[dict[str, Any]] = []
        for sid, st in shards.items():
            if st["up"]:
                try:
                    keys += await self._created_keys(sid)
                except OribusError as e:  # it went down since it answered its stats call
                    st = {"up": False, "error": f"{type(e).__name__}: {e}"}
            if not st["up"]:
                status.append({"shard": sid, "up": False, "error": st["error"]})
                continue
            status.append({"shard": sid, "up": True})
            dl = st.get("delivery_log") or {}
            agents += dl.get("sessions", 0)
            deliveries += dl.get("entries", 0)
        return {"keys": keys, "agents": agents, "deliveries": deliveries, "servers": status}

    async def _created_keys(self, shard_id: int) -> int:
        """Keys created through this API on one shard (their metadata records)."""
        keys = 0
        after = META_PREFIX
        while True:
            page = await self.bus.shards[shard_id].scan(META_PREFIX, after, MAX_KEYS_PER_REQUEST)
            keys += len(page)
            if len(page) < MAX_KEYS_PER_REQUEST:
                return keys
            after = page[-1].key

    async def stats(self, request: web.Request) -> web.Response:
        c = self.counters
        t = await self._totals()
        attempts = c["commits"] + c["conflicts"]
        return json_response({
            "total_shards": t["keys"],
            "total_commits": c["commits"],
            "total_conflicts": c["conflicts"],
            "cross_shard_stale": c["cross_shard_stale"],
            "session_expired": c["session_expired"],
            "total_attempts": attempts,
            "scr": c["conflicts"] / attempts if attempts else 0.0,
            "ori_enabled": self.bus.validation_enabled,
            "wal_enabled": True,
            "delivery_log": {"agents": t["agents"], "deliveries": t["deliveries"]},
            "bus": dict(self.bus.coordinator.counters),
            # oribus's shard servers: the totals above count only those that answer
            "servers": t["servers"],
        })

    # ---- admin -------------------------------------------------------------------------

    async def admin_reset(self, request: web.Request) -> web.Response:
        """S-Bus's reset: every key absent and every session's read log empty.

        First every session's deliveries are dropped (``Bus.reset_every_session``),
        then every key is deleted — in one atomic commit per page of up to
        ``MAX_KEYS_PER_REQUEST`` keys, until a scan finds none. In that order, a
        read made while the reset runs is of a version the deletes then make
        stale, so a commit depending on it is refused; nothing read before the
        reset can pass as current afterwards either (oribus versions never go
        back; only the S-Bus numbering restarts, from each key's base).
        """
        await self.bus.reset_every_session()
        cleared = 0
        while True:
            page = await self.bus.scan("", "", MAX_KEYS_PER_REQUEST)
            if not page:
                break
            req = CommitRequest(session=_ADMIN, commit_id=uuid.uuid4().hex,
                                writes={i.key: None for i in page})
            await self.gw.commit_unread(req, may_write_reserved=True)
            cleared += sum(1 for i in page if not i.key.startswith(RESERVED_PREFIXES))
        self._per_key.clear()
        for k in self.counters:
            self.counters[k] = 0
        return json_response({"cleared": cleared})

    async def admin_get_config(self, request: web.Request) -> web.Response:
        return json_response({"ori_enabled": self.bus.validation_enabled})

    async def admin_set_config(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        enabled = _field(body, "ori_enabled", kind=bool)
        self.bus.set_validation(enabled)
        return json_response({"ok": True, "ori_enabled": self.bus.validation_enabled})

    async def admin_delivery_log(self, request: web.Request) -> web.Response:
        views = [v for v in await self.bus.session_views(MAX_SESSIONS_LISTED) if v["session"] == SESSION_ID]
        keys = sorted({r["key"] for v in views for r in v["reads"]})
        bases: dict[str, int] = {}
        for i in range(0, len(keys), MAX_KEYS_PER_REQUEST):
            metas = await self._metas(keys[i:i + MAX_KEYS_PER_REQUEST])
            bases.update((k, m.get("base", 0)) for k, m in metas.items())
        agents: dict[str, dict] = {}
        for v in views:
            agents[v["agent"]] = {
                r["key"]: {"version": max(-1, r["version"] - bases[r["key"]] - 1),
                           "current_version": max(-1, r["current"] - bases[r["key"]] - 1),
                           "stale": r["stale"], "age_secs": v["idle_seconds"]}
                for r in v["reads"]
            }
        return json_response({"agents": agents, "total_agents": len(agents),
                              "total_deliveries": sum(len(a) for a in agents.values())})

    async def admin_health(self, request: web.Request) -> web.Response:
        t = await self._totals()
        return json_response({"status": "ok", "total_shards": t["keys"],
                              "total_commits": self.counters["commits"],
                              "total_conflicts": self.counters["conflicts"], "delivery_agents": t["agents"]})
