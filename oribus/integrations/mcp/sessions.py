"""One oribus session per MCP session, and the watches its ``changes`` tool polls.

What an MCP session is depends on the transport:

- stdio: the process serves exactly one client, so the process holds one oribus
  session, whatever protocol revision the client speaks;
- streamable HTTP: the ``Mcp-Session-Id`` the SDK's session manager issued at the
  client's ``initialize`` (it answers 404 to any id it did not issue, so the header
  names a live MCP session). A session idle longer than the manager's own timeout
  is dropped here too, with its watches.

The agent name of a session is the configured one (``oribus mcp --agent``), else the
name the MCP client gave in its ``clientInfo``. Every session is opened with
``AsyncSession.session`` on the one bus connection the server holds, so all of them
share it; each has its own deliveries.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from oribus.client import AsyncSession, WatchEvent, WatchStream
from oribus.errors import InvalidRequest, LimitExceeded, OribusError

# The agent name when neither --agent nor the client's clientInfo gives one.
DEFAULT_AGENT = "mcp-client"
# Changes a watch keeps for its next poll; older ones are dropped (and the poll says so).
WATCH_BUFFER = 10_000
# Prefixes one session may watch at once (each holds a watch on the bus).
MAX_WATCHES = 16


@dataclass
class PolledChanges:
    """What one poll of a watch returns."""

    events: list[WatchEvent]
    more: bool  # further changes are already buffered
    dropped: int  # changes lost to a full buffer since the last poll
    error: OribusError | None  # the watch ended with this error (it is closed)


class Watch:
    """A ``WatchStream`` pumped into a bounded buffer by a task, polled by the ``changes`` tool."""

    def __init__(self, stream: WatchStream) -> None:
        self._stream = stream
        self._buffer: list[WatchEvent] = []
        self._arrived = asyncio.Event()
        self._dropped = 0
        self._error: OribusError | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Subscribe (every change made visible from now on is kept), then pump in the background."""
        await self._stream.start()
        self._task = asyncio.create_task(self._pump())

    async def _pump(self) -> None:
        try:
            async for event in self._stream:
                if len(self._buffer) >= WATCH_BUFFER:
                    self._buffer.pop(0)
                    self._dropped += 1
                self._buffer.append(event)
                self._arrived.set()
        except OribusError as e:  # e.g. HistoryTruncated for a replay, or retries exhausted
            self._error = e
        finally:
            self._arrived.set()
            await self._stream.aclose()

    @property
    def ended(self) -> bool:
        return self._task is not None and self._task.done()

    async def poll(self, max_events: int, wait_seconds: float) -> PolledChanges:
        """The buffered changes (at most ``max_events``), waiting up to ``wait_seconds`` for a first."""
        if not self._buffer and not self.ended and wait_seconds > 0:
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), wait_seconds)
            except TimeoutError:
                pass
        events, self._buffer = self._buffer[:max_events], self._buffer[max_events:]
        dropped, self._dropped = self._dropped, 0
        return PolledChanges(events, bool(self._buffer), dropped, self._error)

    async def close(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        await self._stream.aclose()


@dataclass
class SessionState:
    """The oribus session serving one MCP session, and its watches by prefix."""

    session: AsyncSession
    watches: dict[str, Watch] = field(default_factory=dict)
    last_used: float = field(default_factory=time.monotonic)

    async def watch(self, prefix: str, from_version: int | None) -> tuple[Watch, bool]:
        """The session's watch of ``prefix``, started now if it has none; True if it is new."""
        existing = self.watches.get(prefix)
        if existing is not None and not existing.ended:
            return existing, False
        if existing is None and len(self.watches) >= MAX_WATCHES:
            raise LimitExceeded(
                f"this session already watches {MAX_WATCHES} prefixes: unwatch one first",
                prefixes=sorted(self.watches),
            )
        w = Watch(self.session.watch(prefix, from_version))
        await w.start()  # a bad prefix or from_version raises here, before it is kept
        self.watches[prefix] = w
        return w, True

    async def unwatch(self, prefix: str) -> bool:
        w = self.watches.pop(prefix, None)
        if w is not None:
            await w.close()
        return w is not None

    async def close(self) -> None:
        for prefix in list(self.watches):
            await self.unwatch(prefix)


class SessionPool:
    """Which oribus session serves a request (see the module docstring).

    ``base`` is the session ``oribus.connect`` or ``oribus.open_local`` returned: the
    pool opens every MCP session's own session on its bus and closes ``base`` last.
    ``agent`` is the configured agent name (None: the client's clientInfo name).
    ``idle_seconds`` drops HTTP sessions unused that long (None: never).
    """

    def __init__(self, base: AsyncSession, agent: str | None, *, idle_seconds: float | None = None) -> None:
        self.base = base
        self.agent = agent
        self.idle_seconds = idle_seconds
        self._single: SessionState | None = None
        self._by_id: dict[str, SessionState] = {}

    def agent_for(self, client_name: str | None) -> str:
        return self.agent or client_name or DEFAULT_AGENT

    def _open(self, client_name: str | None) -> SessionState:
        return SessionState(self.base.session(agent=self.agent_for(client_name)))

    async def for_request(self, mcp_session_id: str | None, client_name: str | None) -> SessionState:
        """The state of the MCP session a request belongs to (``mcp_session_id`` None: stdio)."""
        await self._drop_idle()
        if mcp_session_id is None:
            if self._single is None:
                self._single = self._open(client_name)
            state = self._single
        else:
            if not mcp_session_id:
                raise InvalidRequest("the request names no MCP session (Mcp-Session-Id)")
            state = self._by_id.get(mcp_session_id) or self._by_id.setdefault(mcp_session_id, self._open(client_name))
        state.last_used = time.monotonic()
        return state

    async def _drop_idle(self) -> None:
        if self.idle_seconds is None:
            return
        horizon = time.monotonic() - self.idle_seconds
        for sid, state in list(self._by_id.items()):
            if state.last_used < horizon:
                del self._by_id[sid]
                await state.close()

    async def close(self) -> None:
        """Close every session's watches, then the bus connection (or the embedded engine)."""
        states = [*self._by_id.values(), *([self._single] if self._single else [])]
        self._by_id.clear()
        self._single = None
        for state in states:
            await state.close()
        await self.base.close()
