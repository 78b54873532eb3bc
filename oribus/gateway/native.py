"""The native JSON API, ``/v1``: the SDK's operations over plain HTTP.

Every request names its session with ``agent`` (required) and ``session``
(default ``"http"``) — in the JSON body, or in the query string for GETs.
Reads are deliveries, exactly as through the SDK; commits are checked
against them (session scope by default; ``"scope": "transaction"`` with the
``seqs`` a read returned as ``since`` checks only the reads made since).
Values are JSON (bytes as ``{"$bytes": base64}``, see ``values.py``).
Errors use the codes of every other transport, with the HTTP statuses of
``errors.HTTP_STATUS``.

Until agents authenticate, ``POST /v1/session`` hands a ``session_token`` to
whoever opens a session nobody uses yet; ``/v1/reset`` and ``/v1/forget`` with
it clear the reads as asked. Without it the session's reads are dropped too,
but the session is marked so that its next commit fails closed (410), since
the caller may not be the agent that made them (``sessions.py``).
``/v1/sessions`` lists every agent's reads: admin only (under ``--auth``: an identity with the
admin grant sees every session, any other its own with only the keys it may read). The document describing all of it is served at
``/v1/openapi.json`` (``openapi.py``; kept in ``specs/openapi.json``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from typing import TYPE_CHECKING, Any, TypeVar

from aiohttp import web

from oribus.contract import CommitRequest, Entry, ensure_subscribed
from oribus.errors import InvalidRequest, OribusError
from oribus.gateway.errors import LOG_FIELDS, RequestError, error_body, json_response
from oribus.gateway.values import from_json, to_json
from oribus.messages import ReadItem, Scope, WatchRequest
from oribus.types import MAX_SESSIONS_LISTED, SessionRef, decode_value, encode_value

if TYPE_CHECKING:
    from oribus.gateway.app import HttpGateway

DEFAULT_SESSION = "http"
KEYS_PAGE = 100  # keys GET /v1/keys lists when not told how many
SESSIONS_PAGE = 50  # sessions GET /v1/sessions lists when not told how many


def _get(body: dict, name: str, kind: type | tuple[type, ...], default: Any = ..., ) -> Any:
    if name not in body or body[name] is None:
        if default is ...:
            raise InvalidRequest(f"missing field {name!r}", field=name)
        return default
    v = body[name]
    if not isinstance(v, kind) or (isinstance(v, bool) and kind in (int, (int, float))):
        want = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise InvalidRequest(f"field {name!r} must be {want}, not {type(v).__name__}", field=name)
    return v


def _session(src: Any) -> SessionRef:
    agent = src.get("agent")
    session = src.get("session") or DEFAULT_SESSION
    if not isinstance(agent, str) or not agent:
        raise InvalidRequest("an 'agent' (non-empty string) is required", field="agent")
    if not isinstance(session, str):
        raise InvalidRequest("'session' must be a string", field="session")
    return SessionRef(agent, session)


def _versions(body: dict, name: str) -> dict[str, int]:
    m = _get(body, name, dict, {})
    for k, v in m.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise InvalidRequest(f"{name}[{k!r}] must be an int >= 0", field=name)
    return m


def _client(request: web.Request) -> str:
    """The address a session is used from (its per-client cap)."""
    return request.remote or ""


_Default = TypeVar("_Default", int, None)


def _int_query(request: web.Request, name: str, default: _Default) -> int | _Default:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise InvalidRequest(f"query parameter {name!r} must be an integer", field=name) from None


def _item(i: ReadItem) -> dict:
    return {"key": i.key, "value": to_json(decode_value(i.value)), "version": i.version}


def _entry(e: Entry) -> dict:
    return {
        "version": e.version, "value": None if e.deleted else to_json(decode_value(e.value)),
        "deleted": e.deleted, "agent": e.agent, "session": e.session,
        "commit_id": e.commit_id, "committed_at": e.committed_at,
    }


class NativeRoutes:
    def __init__(self, gateway: HttpGateway) -> None:
        self.gw = gateway
        self.bus = gateway.api  # the bus, or behind the access rules (--auth)

    def register(self, router: web.UrlDispatcher) -> None:
        r = router
        r.add_get("/v1/openapi.json", self.openapi)
        r.add_get("/v1/keys", self.list_keys)
        r.add_get("/v1/keys/{key:.+}", self.get_one)
        r.add_post("/v1/get", self.get_many)
        r.add_post("/v1/commit", self.commit)
        r.add_post("/v1/rollback", self.rollback)
        r.add_get("/v1/history/{key:.+}", self.history)
        r.add_post("/v1/forget", self.forget)
        r.add_post("/v1/reset", self.reset)
        r.add_post("/v1/session", self.open_session)
        r.add_get("/v1/watch", self.watch)
        r.add_get("/v1/stats", self.stats)
        r.add_get("/v1/sessions", self.sessions)

    async def openapi(self, request: web.Request) -> web.Response:
        from oribus.gateway.openapi import document

        return json_response(document())

    # ---- reads -------------------------------------------------------------------------

    async def _read(self, request: web.Request, session: SessionRef, keys: list, record: bool) -> dict:
        request[LOG_FIELDS]["agent"] = session[0]
        got = await self.bus.read(session, keys, record, durable_session=record, client=_client(request))
        return {"items": [_item(i) for i in got.items], "seqs": {str(s): q for s, q in got.seqs.items()}}

    async def get_one(self, request: web.Request) -> web.Response:
        record = request.query.get("record", "true").lower() not in ("false", "0", "no")
        out = await self._read(request, _session(request.query), [request.match_info["key"]], record)
        return json_response({**out["items"][0], "seqs": out["seqs"]})

    async def get_many(self, request: web.Request) -> web.Response:
        body = await self.gw.body(request)
        keys = _get(body, "keys", list)
        record = _get(body, "record", bool, True)
        return json_response(await self._read(request, _session(body), keys, record))

    async def list_keys(self, request: web.Request) -> web.Response:
        limit = _int_query(request, "limit", KEYS_PAGE)
        items = await self.bus.scan(request.query.get("prefix", ""), request.query.get("after", ""), limit)
        return json_response({
            "items": [{**_item(i), "agent": i.agent, "committed_at": i.committed_at} for i in items],
            "next_after": items[-1].key if len(items) == limit else None,
        })

    async def history(self, request: web.Request) -> web.Response:
        key = request.match_info["key"]
        entries = await self.bus.history(key, _int_query(request, "limit", None))
        return json_response({"key": key, "versions": [_entry(e) for e in entries]})

    # ---- commits -----------------------------------------------------------------------

    async def commit(self, request: web.Request) -> web.Response:
        body = await self.gw.body(request)
        session = _session(body)
        limit = self.bus.max_value_bytes
        writes: dict[str, bytes | None] = {
            k: encode_value(from_json(v), limit) for k, v in _get(body, "writes", dict, {}).items()
        }
        for k in _get(body, "deletes", list, []):
            if not isinstance(k, str):
                raise InvalidRequest("deletes must be a list of keys", field="deletes")
            writes[k] = None
        scope_name = _get(body, "scope", str, "session")
        try:
            scope = Scope(scope_name)
        except ValueError:
            raise InvalidRequest(f"scope must be 'session' or 'transaction', not {scope_name!r}",
                                 field="scope") from None
        since_raw = _get(body, "since", dict, {})
        try:
            since = {int(s): int(q) for s, q in since_raw.items()}
        except (TypeError, ValueError):
            raise InvalidRequest("since must map shard ids to sequence numbers", field="since") from None
        req = CommitRequest(
            session=session,
            commit_id=_get(body, "commit_id", str, "") or uuid.uuid4().hex,
            writes=writes,
            rollback=_versions(body, "rollback"),
            expect=_versions(body, "expect"),
            read_set=_versions(body, "read_set"),
            scope=scope,
            since=since,
            strict=_get(body, "strict", bool, False),
            complete_tokens=True,
        )
        request[LOG_FIELDS].update(agent=session[0], commit_id=req.commit_id)
        result = await self.bus.commit(req, durable_session=True, client=_client(request))
        return json_response({"commit_id": result.commit_id, "versions": result.versions,
                              "two_phase": result.two_phase})

    async def rollback(self, request: web.Request) -> web.Response:
        body = await self.gw.body(request)
        session = _session(body)
        req = CommitRequest(session=session, commit_id=_get(body, "commit_id", str, "") or uuid.uuid4().hex,
                            rollback=_versions(body, "versions"), complete_tokens=True)
        if not req.rollback:
            raise InvalidRequest("versions must name at least one key", field="versions")
        request[LOG_FIELDS].update(agent=session[0], commit_id=req.commit_id)
        result = await self.bus.commit(req, durable_session=True, client=_client(request))
        return json_response({"commit_id": result.commit_id, "versions": result.versions,
                              "two_phase": result.two_phase})

    def _owns(self, body: dict, session: SessionRef) -> bool:
        return self.bus.sessions.is_owner(session, _get(body, "session_token", str, None))

    async def forget(self, request: web.Request) -> web.Response:
        body = await self.gw.body(request)
        session = _session(body)
        marked = await self.bus.forget(session, _get(body, "keys", list), caller_owns=self._owns(body, session))
        return json_response({"ok": True, "next_commit_refused": marked})

    async def reset(self, request: web.Request) -> web.Response:
        body = await self.gw.body(request)
        session = _session(body)
        marked = await self.bus.reset(session, caller_owns=self._owns(body, session))
        return json_response({"ok": True, "next_commit_refused": marked})

    async def open_session(self, request: web.Request) -> web.Response:
        """Start a session afresh; a session nobody uses yet gets its ``session_token``."""
        body = await self.gw.body(request)
        session = _session(body)
        owns = self._owns(body, session)
        marked = await self.bus.reset(session, caller_owns=owns)
        token = body["session_token"] if owns else await self.bus.open_session(session, _client(request))
        return json_response({"agent": session[0], "session": session[1], "session_token": token,
                              "next_commit_refused": marked})

    # ---- views -------------------------------------------------------------------------

    async def stats(self, request: web.Request) -> web.Response:
        return json_response(await self.bus.stats())

    async def sessions(self, request: web.Request) -> web.Response:
        # every agent's reads: not for every caller (under --auth each caller sees its own, admin all)
        if not self.gw.config.admin and self.gw.authority is None:
            raise RequestError(403, "Forbidden", "GET /v1/sessions is an admin route (start the server with --admin)")
        limit = _int_query(request, "limit", SESSIONS_PAGE)
        if not 1 <= limit <= MAX_SESSIONS_LISTED:
            raise InvalidRequest(f"limit must be 1..{MAX_SESSIONS_LISTED}", field="limit")
        return json_response({"sessions": await self.bus.session_views(limit)})

    async def watch(self, request: web.Request) -> web.StreamResponse:
        """Server-Sent Events: one ``change`` event per committed write, in version order per key.

        Each event's id is ``<committed_at>``; a client that reconnects with
        ``Last-Event-ID`` resumes from that time (changes committed in the same
        instant may be repeated, never skipped). An error ends the stream with
        an ``error`` event carrying the error body.
        """
        from_version = _int_query(request, "from_version", None)
        since = None
        last = request.headers.get("Last-Event-ID") or request.query.get("since")
        if last:
            try:
                since = float(last)
            except ValueError:
                raise InvalidRequest("Last-Event-ID / since must be a commit time", field="since") from None
        stream = self.bus.watch(WatchRequest(request.query.get("prefix", ""), from_version, since=since))
        await ensure_subscribed(stream)
        response = web.StreamResponse(headers={
            "Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no",
        })
        await response.prepare(request)
        await response.write(b": subscribed\n\n")
        iterator = stream.__aiter__()
        try:
            while True:
                try:
                    change = await asyncio.wait_for(iterator.__anext__(), 15.0)
                except TimeoutError:
                    await response.write(b": keep-alive\n\n")
                    continue
                except StopAsyncIteration:
                    break
                data = {
                    "key": change.key, "version": change.version, "deleted": change.deleted,
                    "value": None if change.deleted else to_json(decode_value(change.value)),
                    "agent": change.agent, "session": change.session, "commit_id": change.commit_id,
                    "committed_at": change.committed_at,
                }
                await response.write(
                    f"event: change\nid: {change.committed_at!r}\ndata: {json.dumps(data)}\n\n".encode()
                )
        except OribusError as e:
            with contextlib.suppress(ConnectionError, RuntimeError):
                await response.write(f"event: error\ndata: {json.dumps(error_body(e))}\n\n".encode())
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            close = getattr(stream, "aclose", None) or getattr(stream, "close", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    r = close()
                    if asyncio.iscoroutine(r):
                        await r
        return response
