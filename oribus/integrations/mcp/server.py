"""The bus's tools and resource on an ``MCPServer`` (the ``mcp`` SDK's high-level server).

Each tool finds the oribus session of the MCP session that called it
(``sessions.SessionPool``) and calls the public SDK:

    read(key)                      AsyncSession.get        a delivery, as for any agent
    read_many(keys)                AsyncSession.get_many   one delivery per key
    commit(writes, expect, delete) AsyncSession.commit     checked by ORI; refused: results.refused
    rollback(targets)              AsyncSession.rollback   an ordinary, checked commit
    history(key, limit)            AsyncSession.history    not a delivery
    list(prefix, after, limit)     AsyncSession.scan       not a delivery
    changes(prefix, ...)           AsyncSession.watch      polled; not a delivery
    unwatch(prefix)                                        ends a ``changes`` watch

and the resource ``oribus://key/{key}`` reads a key like ``read`` (a resource a host
puts in the model's context is something the agent has seen).

Arguments are checked twice: their JSON shape by the SDK from the signatures (a
wrong type is a tool error naming the argument), their meaning by oribus (a bad key,
an oversized value: an ``InvalidRequest`` tool error). Nothing a caller sends makes
the server fail: every oribus error becomes a tool error (``results.failure``).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from mcp.server.mcpserver import Context, MCPServer, ResourceSecurity
from mcp.server.mcpserver.exceptions import ResourceError
from mcp.types import CallToolResult, ToolAnnotations
from pydantic import Field

from oribus.client import DELETE, Version
from oribus.errors import Conflict, InvalidRequest, OribusError, SessionExpired
from oribus.integrations.mcp import results
from oribus.integrations.mcp.results import ConflictRow
from oribus.integrations.mcp.sessions import SessionPool, SessionState

INSTRUCTIONS = """\
oribus is a shared state bus for agents. Keys hold JSON values with a version each.
Read the keys your work depends on (read, read_many), then commit your writes: a commit
is refused if any key you read has changed since, and the refusal tells you the
current values and who wrote them, so you can re-plan and commit again. history shows
past versions, rollback restores one, list shows keys under a prefix, changes polls for
changes under a prefix (list, history and changes are not reads: read a key before
committing based on it)."""

# Bounds of the arguments a model may pass (the bus has its own limits besides).
MAX_HISTORY = 1000
MAX_LIST = 1000
MAX_CHANGES = 1000
MAX_WAIT_SECONDS = 60.0
# Kept versions read to find who wrote a conflicting key's current version.
_WRITER_LOOKBACK = 20

_READ_ONLY = ToolAnnotations(read_only_hint=True, open_world_hint=False)
_WRITES = ToolAnnotations(read_only_hint=False, destructive_hint=True, idempotent_hint=False, open_world_hint=False)


def _mcp_session_id(ctx: Context) -> str | None:
    headers = ctx.headers
    if headers is None:
        return None  # stdio: the process serves one client
    return headers.get("mcp-session-id", "")


def _client_name(ctx: Context) -> str | None:
    params = ctx.session.client_params
    return params.client_info.name if params is not None else None


async def _writer_of(state: SessionState, key: str, version: int) -> Version | None:
    if version == 0:
        return None
    for v in await state.session.history(key, _WRITER_LOOKBACK):
        if v.version == version:
            return v
    return None  # no longer kept


async def _refused(state: SessionState, e: Conflict) -> CallToolResult:
    """Read the offending keys again (a delivery: the model is shown them) and say who wrote them."""
    keys = sorted({s.key for s in e.stale})
    current = await state.session.get_many(keys) if keys else {}
    rows = [ConflictRow(s, current[s.key], await _writer_of(state, s.key, current[s.key].version))
            for s in sorted(e.stale, key=lambda s: s.key)]
    return results.refused(e, rows)


def build_server(pool: SessionPool, *, name: str = "oribus") -> MCPServer:
    """An MCP server whose tools act on the bus behind ``pool``'s sessions."""
    server: MCPServer = MCPServer(name, instructions=INSTRUCTIONS)

    async def serve(ctx: Context, act: Callable[[SessionState], Awaitable[CallToolResult]]) -> CallToolResult:
        try:
            state = await pool.for_request(_mcp_session_id(ctx), _client_name(ctx))
        except OribusError as e:
            return results.failure(e)
        try:
            try:
                return await act(state)
            except Conflict as e:
                return await _refused(state, e)  # its reads may raise too: handled below
        except SessionExpired as e:
            # Part of what this session read may be lost: a commit cannot be checked
            # against it, so start over from a clean session (specs/PROTOCOL.md §3).
            try:
                await state.session.reset_session()
            except OribusError as reset_failed:
                return results.failure(e, f"Resetting the session failed too ({reset_failed.message}): "
                                          "try again later.")
            return results.failure(e, "The session was reset: read again every key your next commit "
                                      "depends on, then commit.")
        except OribusError as e:
            return results.failure(e)

    @server.tool(annotations=_READ_ONLY)
    async def read(
        key: Annotated[str, Field(description="the key to read, e.g. 'plan' or 'team-a/tasks'")],
        ctx: Context,
    ) -> CallToolResult:
        """Read one key: its JSON value and version (version 0 and null: the key does not exist).
        The read is recorded: a later commit is refused if this key changed meanwhile."""
        async def act(s: SessionState) -> CallToolResult:
            i = await s.session.get(key)
            return results.answer(f"{key} is at version {i.version}" + ("" if i.exists else " (absent)"),
                                  results.item(i))
        return await serve(ctx, act)

    @server.tool(annotations=_READ_ONLY)
    async def read_many(
        keys: Annotated[list[str], Field(description="the keys to read", min_length=1)],
        ctx: Context,
    ) -> CallToolResult:
        """Read several keys at once; each read is recorded as with read."""
        async def act(s: SessionState) -> CallToolResult:
            items = await s.session.get_many(keys)
            return results.answer(f"read {len(items)} keys", {"items": [results.item(i) for i in items.values()]})
        return await serve(ctx, act)

    @server.tool(annotations=_WRITES)
    async def commit(
        writes: Annotated[dict[str, Any], Field(description="key -> new JSON value (not null: use delete)")],
        ctx: Context,
        expect: Annotated[dict[str, int] | None, Field(
            description="optional key -> the version the key must be at for the commit to apply")] = None,
        delete: Annotated[list[str] | None, Field(description="optional keys to delete")] = None,
    ) -> CallToolResult:
        """Write keys atomically: all or nothing. Refused (nothing written) if a key this session read
        has changed since, or a key is not at its expected version; the refusal lists each such key
        with its current value, version and the agent that wrote it."""
        nulls = sorted(k for k, v in writes.items() if v is None)
        if nulls:
            return results.failure(InvalidRequest(f"null is not a value: {', '.join(nulls)} (to remove a key, "
                                                  "list it in delete)", keys=nulls))
        both = sorted(set(writes) & set(delete or []))
        if both:
            return results.failure(InvalidRequest(f"keys both written and deleted: {', '.join(both)}", keys=both))
        changes: dict[str, Any] = {**writes, **dict.fromkeys(delete or [], DELETE)}
        if not changes:
            return results.failure(InvalidRequest("nothing to commit: give writes or delete"))

        async def act(s: SessionState) -> CallToolResult:
            versions = await s.session.commit(changes, expect=expect)
            return results.answer(f"committed {len(versions)} keys", {"committed": True, "versions": versions})
        return await serve(ctx, act)

    @server.tool(annotations=_WRITES)
    async def rollback(
        targets: Annotated[dict[str, int], Field(
            description="key -> the earlier version whose value to restore (0 deletes the key)", min_length=1)],
        ctx: Context,
    ) -> CallToolResult:
        """Restore keys to the values they had at earlier versions, as one commit (new versions carry
        the old values). Checked like commit: read the keys first."""
        async def act(s: SessionState) -> CallToolResult:
            versions = await s.session.rollback(targets)
            return results.answer(f"rolled back {len(versions)} keys", {"committed": True, "versions": versions})
        return await serve(ctx, act)

    @server.tool(annotations=_READ_ONLY)
    async def history(
        key: Annotated[str, Field(description="the key")],
        ctx: Context,
        limit: Annotated[int, Field(description="at most this many versions", ge=1, le=MAX_HISTORY)] = 20,
    ) -> CallToolResult:
        """Past versions of a key, newest first, with the agent that wrote each. Not a read."""
        async def act(s: SessionState) -> CallToolResult:
            versions = await s.session.history(key, limit)
            return results.answer(f"{len(versions)} versions of {key}, newest first",
                                  {"key": key, "versions": [results.version(v) for v in versions]})
        return await serve(ctx, act)

    @server.tool(name="list", annotations=_READ_ONLY)
    async def list_keys(
        ctx: Context,
        prefix: Annotated[str, Field(description="only keys starting with this")] = "",
        after: Annotated[str, Field(description="only keys after this one (the last key of the previous page)")] = "",
        limit: Annotated[int, Field(description="at most this many keys", ge=1, le=MAX_LIST)] = 100,
    ) -> CallToolResult:
        """Existing keys under a prefix, in key order, with their versions. Not a read: read a key
        before committing based on it."""
        async def act(s: SessionState) -> CallToolResult:
            page = await s.session.scan(prefix, after=after, limit=limit)
            data = {"keys": [{"key": i.key, "version": i.version} for i in page],
                    "next_after": page[-1].key if len(page) == limit else None}
            return results.answer(f"{len(page)} keys under {prefix!r}", data)
        return await serve(ctx, act)

    @server.tool(annotations=_READ_ONLY)
    async def changes(
        ctx: Context,
        prefix: Annotated[str, Field(description="watch keys starting with this")] = "",
        from_version: Annotated[int | None, Field(
            description="on the first call for this prefix: also replay every kept version after this one "
                        "(0: all); default: only changes from now on", ge=0)] = None,
        wait_seconds: Annotated[float, Field(
            description="wait up to this long for a change if none is waiting", ge=0, le=MAX_WAIT_SECONDS)] = 0,
        max_events: Annotated[int, Field(description="at most this many changes", ge=1, le=MAX_CHANGES)] = 100,
    ) -> CallToolResult:
        """Changes of keys under a prefix since the previous call for that prefix. The first call
        starts watching and returns what is already there; call again to get what changed since.
        Not a read: read a key before committing based on it."""
        async def act(s: SessionState) -> CallToolResult:
            watch, started = await s.watch(prefix, from_version)
            polled = await watch.poll(max_events, wait_seconds)
            data: dict[str, Any] = {
                "prefix": prefix,
                "started_watching": started,
                "changes": [{"key": e.key, "version": e.version, "value": e.value, "deleted": e.deleted,
                             "agent": e.agent, "commit_id": e.commit_id, "committed_at": e.committed_at}
                            for e in polled.events],
                "more": polled.more,
            }
            if polled.dropped:
                data["dropped"] = polled.dropped
            if polled.error is not None:
                await s.unwatch(prefix)
                data["watch_ended"] = polled.error.to_dict()
            summary = f"{len(polled.events)} changes under {prefix!r}"
            if polled.dropped:
                summary += f"; {polled.dropped} older changes were dropped (read the keys you need)"
            if polled.error is not None:
                summary += f"; the watch ended: {polled.error.message}"
            return results.answer(summary, data, error=polled.error is not None and not polled.events)
        return await serve(ctx, act)

    @server.tool(annotations=_READ_ONLY)
    async def unwatch(
        prefix: Annotated[str, Field(description="the prefix a changes call watches")],
        ctx: Context,
    ) -> CallToolResult:
        """Stop watching a prefix that changes started watching."""
        async def act(s: SessionState) -> CallToolResult:
            stopped = await s.unwatch(prefix)
            return results.answer(f"{'stopped' if stopped else 'was not'} watching {prefix!r}",
                                  {"prefix": prefix, "stopped": stopped})
        return await serve(ctx, act)

    @server.resource("oribus://key/{+key}", name="key", mime_type="application/json",
                     description="A key's value and version (reading it is recorded, as with the read tool)",
                     security=ResourceSecurity(exempt_params={"key"}))
    async def key_resource(key: str, ctx: Context) -> str:
        try:
            state = await pool.for_request(_mcp_session_id(ctx), _client_name(ctx))
            item = await state.session.get(key)
        except OribusError as e:
            raise ResourceError(f"{e.code}: {e.message}") from e
        return json.dumps(results.jsonable(results.item(item)), ensure_ascii=False)

    return server
