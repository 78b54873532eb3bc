"""The operator dashboard: ``GET /`` serves one static page, ``GET /dashboard/state`` its feed.

The page (``dashboard.html``: plain HTML, vanilla JS, an inline SVG chart; no
build step, nothing loaded from elsewhere) polls the feed once a second and
draws it. The feed, one JSON object::

    {"now": <epoch s>, "admin": bool, "everything": bool, "uptime_seconds": float,
     "shards":   [{"shard", "up", "epoch" (a string), "keys", "prepared", "dlog_sessions",
                   "dlog_entries", "wal_fsyncs", "watchers", "error",
                   "group": {"replicas", "term", "primary", "last_lsn", "commit_lsn",
                             "members": [{"member", "address", "stream", "role", "voter", "term",
                                          "durable_lsn", "applied_lsn", "acked_lsn", "lag_records",
                                          "last_ack_seconds", "error"}, ...],
                             "failovers", "last_failover", "etcd_error"} | null}, ...],
     "bus":      {"commits", "conflicts", "commits_1pc", "commits_2pc", "aborts_2pc",
                  "sessions", "durable_sessions", "validation"},
     "rates":    {"interval": 1.0, "window_seconds": 300,
                  "points": [{"t", "commits", "conflicts"}, ...]},   # per interval
     "hot_keys": {"half_life_seconds": 60, "watching": bool, "error": str | null,
                  "keys": [{"key", "score", "writes"}, ...]},       # hottest first
     "sessions": [{"agent", "session", "idle_seconds",
                   "reads": [{"key", "version", "current", "stale"}]}, ...],
     "sessions_error": str | null}       # sessions: [] and an error saying why, unless admin
                                         # (or under --auth: the caller's own)

Where the numbers come from, without touching the bus: commit and conflict
rates are the coordinator's counters (``Bus.coordinator.counters``) sampled
once a second into a ring buffer (``RateSeries``); hot keys are counted from
a live watch over every key (``Bus.watch(WatchRequest(""))``), with exponential decay so
that the list follows the recent load (``HotKeys``); keys under ``.sbus/``
(the S-Bus gateway's metadata) are not counted. The sampler starts with the
gateway (a dict read a second), so the chart shows commits made before anyone
opened the page; the watch starts on the first dashboard request (an
unwatched server does not stream every change to itself) with a replay of
the last ``HOT_REPLAY`` seconds of history (``WatchRequest(since=...)``), each
write counted at its commit time, so the first answer lists the keys written
before. Both are cancelled by ``close()``. A shard's epoch is sent as a
string: it is a nanosecond clock, beyond the integers a JavaScript number
holds exactly.

Under ``--auth`` (specs/auth.md) the page asks for a token and sends it as
``Authorization: Bearer`` with every request (401 without one). The feed is for any
identity, and shows each what it may see: with the admin grant everything
(``"everything": true``); without it, its own sessions (``SessionOwners``) with only the keys
it may read, and only those among the hot keys (the shard and bus counters name no key and
are shown to all, as ``stats`` is). The rollback needs the admin grant (403 otherwise), and
``"admin"`` is true only for an identity that has it on a server run with ``--admin``.

Rollback from the page goes through ``POST /dashboard/rollback`` — a
rollback commit by the session ``("dashboard", "dashboard")`` that depends
only on the version the page showed (``HttpGateway.commit_unread``),
refused with 403 unless the gateway runs with ``admin`` — so a read-only
dashboard is read-only on the server too, not just on the page.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from importlib import resources
from typing import TYPE_CHECKING, Any, TypeGuard

from aiohttp import web

from oribus.bus.guarded import GuardedBus
from oribus.contract import CommitRequest, ensure_subscribed
from oribus.errors import InvalidRequest, OribusError
from oribus.gateway.errors import LOG_FIELDS, json_response, request_error
from oribus.messages import Change, WatchRequest
from oribus.types import SessionRef

if TYPE_CHECKING:
    from oribus.gateway.app import HttpGateway

log = logging.getLogger("oribus.http")

SAMPLE_INTERVAL = 1.0  # seconds between two samples of the coordinator's counters
RATE_WINDOW = 300  # samples kept: the chart shows the last five minutes
HOT_HALF_LIFE = 60.0  # seconds for a key's write count to lose half its weight
HOT_TRACKED = 2_000  # keys whose counts are kept; past it the coldest half is dropped
HOT_SHOWN = 15  # keys the feed lists
SESSIONS_SHOWN = 50  # most recently active sessions the feed lists
HOT_REPLAY = 5 * HOT_HALF_LIFE  # seconds of history the hot keys start from (older writes weigh < 1/32)
WATCH_RETRY = 1.0  # seconds before the hot-key watch resubscribes after it ended or failed
HIDDEN_PREFIXES = (".sbus/",)  # gateway metadata, not agents' state
DASHBOARD_SESSION = SessionRef("dashboard", "dashboard")  # the session rollbacks from the page commit as

# The page loads nothing from anywhere: inline script and style only, fetches to this server.
_PAGE_HEADERS = {
    "Cache-Control": "no-cache",
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
        "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
}


class RateSeries:
    """Cumulative counters sampled at intervals, read back as per-interval increments.

    Keeps ``size`` intervals (``size + 1`` samples). A counter that went down
    (a restarted coordinator) counts as starting again from zero.
    """

    def __init__(self, size: int = RATE_WINDOW) -> None:
        self._samples: deque[tuple[float, int, int]] = deque(maxlen=size + 1)

    def sample(self, t: float, commits: int, conflicts: int) -> None:
        self._samples.append((t, commits, conflicts))

    def points(self) -> list[dict[str, float]]:
        out = []
        prev = None
        for t, commits, conflicts in self._samples:
            if prev is not None:
                _, pc, pf = prev
                out.append({
                    "t": round(t, 3),
                    "commits": commits - pc if commits >= pc else commits,
                    "conflicts": conflicts - pf if conflicts >= pf else conflicts,
                })
            prev = (t, commits, conflicts)
        return out


class HotKeys:
    """Write counts per key with exponential decay: the keys written most lately.

    A key's score is the number of its writes, each weighted by
    ``0.5 ** (age / half_life)``; ``writes`` is the undecayed count since the
    key was first tracked. At most ``tracked`` keys are kept: beyond that the
    lowest-scoring half is dropped, so memory stays bounded under any key
    churn (a dropped key that is written again starts from zero).
    """

    def __init__(self, half_life: float = HOT_HALF_LIFE, tracked: int = HOT_TRACKED) -> None:
        self.half_life = half_life
        self.tracked = tracked
        self._keys: dict[str, list[float]] = {}  # key -> [score at stamp, stamp, writes]

    def _decayed(self, entry: list[float], now: float) -> float:
        return entry[0] * math.pow(0.5, max(0.0, now - entry[1]) / self.half_life)

    def add(self, key: str, now: float) -> None:
        """Count a write made at ``now``; writes may come out of order (a replay merged
        from several shards): an earlier one adds its weight as seen from the stamp."""
        entry = self._keys.get(key)
        if entry is None:
            if len(self._keys) >= self.tracked:
                self._prune(now)
            self._keys[key] = [1.0, now, 1]
            return
        if now >= entry[1]:
            entry[0] = self._decayed(entry, now) + 1.0
            entry[1] = now
        else:
            entry[0] += math.pow(0.5, (entry[1] - now) / self.half_life)
        entry[2] += 1

    def _prune(self, now: float) -> None:
        ranked = sorted(self._keys, key=lambda k: self._decayed(self._keys[k], now))
        for k in ranked[: max(1, len(ranked) // 2)]:
            del self._keys[k]

    def top(self, n: int, now: float, keep: Callable[[str], bool] | None = None) -> list[dict[str, Any]]:
        """The ``n`` hottest keys (of those ``keep`` keeps)."""
        scored = [(self._decayed(e, now), k, int(e[2])) for k, e in self._keys.items() if keep is None or keep(k)]
        scored.sort(key=lambda s: (-s[0], s[1]))
        return [{"key": k, "score": round(score, 3), "writes": writes} for score, k, writes in scored[:n]]

    def __len__(self) -> int:
        return len(self._keys)


def _shard_row(sid: int, st: Mapping[str, Any]) -> dict[str, Any]:
    dlog = st.get("delivery_log") or {}
    wal = st.get("wal") or {}
    return {
        "shard": sid,
        "up": bool(st.get("up")),
        "epoch": None if st.get("epoch") is None else str(st["epoch"]),  # beyond 2**53: exact only as text
        "keys": st.get("keys"),
        "prepared": st.get("prepared"),
        "dlog_sessions": dlog.get("sessions"),
        "dlog_entries": dlog.get("entries"),
        "wal_fsyncs": wal.get("fsyncs"),
        "watchers": st.get("watchers"),
        "error": st.get("error"),
        "group": _group_view(st.get("group")),
    }


def _group_view(group: object) -> dict[str, Any] | None:
    """A replicated shard's group as the page draws it (``oribus.hosts.group_stats``): the
    stats' ``group`` section without the quorum-wait histogram, which is /metrics' (None:
    the shard is a single copy, or down)."""
    if not isinstance(group, Mapping):
        return None
    return {k: v for k, v in group.items() if k != "quorum_wait_seconds"}


def _is_version(v: object) -> TypeGuard[int]:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


class DashboardRoutes:
    def __init__(self, gateway: HttpGateway) -> None:
        self.gw = gateway
        self.bus = gateway.bus
        self.rates = RateSeries(RATE_WINDOW)
        self.hot = HotKeys(HOT_HALF_LIFE, HOT_TRACKED)
        self.watch_error: str | None = None  # why the hot-key watch is not running, if it is not
        self._watching = False
        self._page: bytes | None = None
        self._task: asyncio.Task[None] | None = None  # the hot-key watch
        self._sampler: asyncio.Task[None] | None = None
        self._start_lock = asyncio.Lock()
        self._closed = False

    def register(self, router: web.UrlDispatcher) -> None:
        router.add_get("/", self.page)
        router.add_get("/dashboard/state", self.state)
        router.add_post("/dashboard/rollback", self.rollback)

    # ---- routes ------------------------------------------------------------------------

    async def page(self, request: web.Request) -> web.Response:
        await self._ensure_running()
        if self._page is None:
            self._page = resources.files(__package__).joinpath("dashboard.html").read_bytes()
        return web.Response(body=self._page, content_type="text/html", charset="utf-8",
                            headers=_PAGE_HEADERS)

    async def state(self, request: web.Request) -> web.Response:
        await self._ensure_running()
        now = time.time()
        counters = dict(self.bus.coordinator.counters)
        health = await self.gw.shard_health()
        # under --auth: an identity without the admin grant sees its own sessions and the keys it may read
        guard = self.gw.api if isinstance(self.gw.api, GuardedBus) else None
        everything = guard is None or guard.may_see_everything()
        sessions: list[dict] = []
        sessions_error = None
        if guard is None and not self.gw.config.admin:  # every agent's reads are the admins' (as /v1/sessions)
            sessions_error = "each agent's reads are shown only when the server runs with --admin"
        else:
            try:
                sessions = await asyncio.wait_for(self.gw.api.session_views(SESSIONS_SHOWN),
                                                  self.gw.config.ready_timeout)
            except (OribusError, TimeoutError) as e:  # a shard down must not blank the whole page
                sessions_error = f"{type(e).__name__}: {e}"
        hot_keys = self.hot.top(HOT_SHOWN, now, None if everything or guard is None else guard.may_read())
        return json_response({
            "now": now,
            "admin": self.gw.config.admin and everything,
            "everything": everything,
            "uptime_seconds": round(now - self.gw.started_at, 3),
            "shards": [_shard_row(sid, st) for sid, st in sorted(health.items())],
            "bus": {
                "commits": counters.get("commits_1pc", 0) + counters.get("commits_2pc", 0),
                "conflicts": counters.get("conflicts", 0),
                "commits_1pc": counters.get("commits_1pc", 0),
                "commits_2pc": counters.get("commits_2pc", 0),
                "aborts_2pc": counters.get("aborts_2pc", 0),
                "sessions": len(self.bus.sessions),
                "durable_sessions": self.bus.sessions.durable_sessions,
                "validation": self.bus.validation_enabled,
            },
            "rates": {"interval": SAMPLE_INTERVAL, "window_seconds": RATE_WINDOW * SAMPLE_INTERVAL,
                      "points": self.rates.points()},
            "hot_keys": {"half_life_seconds": HOT_HALF_LIFE, "watching": self._watching,
                         "error": self.watch_error, "keys": hot_keys},
            "sessions": sessions,
            "sessions_error": sessions_error,
        }, headers={"Cache-Control": "no-store"})

    async def rollback(self, request: web.Request) -> web.Response:
        """``{"key", "version", "expect"?}``: restore ``key`` to ``version`` (admin only).

        ``expect`` (optional) is the version the operator saw as current: if the
        key moved on since, the rollback is refused (409 Conflict) rather than
        overwrite a write the operator has not seen.
        """
        if not self.gw.config.admin:
            return request_error(403, "Forbidden",
                                 "rollback from the dashboard is disabled (start the server with --admin)")
        body = await self.gw.body(request)
        key, version, expect = body.get("key"), body.get("version"), body.get("expect")
        if not isinstance(key, str) or not key:
            raise InvalidRequest("'key' (non-empty string) is required", field="key")
        if not _is_version(version):
            raise InvalidRequest("'version' must be an int >= 0", field="version")
        if expect is not None and not _is_version(expect):
            raise InvalidRequest("'expect' must be an int >= 0", field="expect")
        req = CommitRequest(
            session=DASHBOARD_SESSION,
            commit_id=uuid.uuid4().hex,
            rollback={key: version},
            expect={key: expect} if expect is not None else {},
        )
        request[LOG_FIELDS].update(agent=DASHBOARD_SESSION[0], commit_id=req.commit_id)
        result = await self.gw.commit_unread(req)
        log.info("dashboard rolled %r back to version %d: now version %d", key, version, result.versions[key])
        return json_response({"commit_id": result.commit_id, "key": key, "restored": version,
                              "version": result.versions[key], "versions": result.versions})

    # ---- the background tasks: rate samples and hot keys ------------------------------

    def start(self) -> None:
        """Start sampling the coordinator's counters with the gateway (a dict read a second,
        no I/O), so that the chart shows the commits made before anyone opened the page."""
        if self._sampler is not None or self._closed:
            return
        self._sample()
        self._sampler = asyncio.get_running_loop().create_task(self._sample_forever())

    async def _ensure_running(self) -> None:
        """Start the hot-key watch on the first dashboard request (an unwatched server does
        not stream every change). It begins with a replay of the last ``HOT_REPLAY`` seconds
        of history, so the first answer already lists the keys written before; it is
        subscribed before this returns, so every later commit is counted too."""
        if self._task is not None or self._closed:
            return
        async with self._start_lock:
            if self._task is not None or self._closed:
                return
            stream = await self._subscribe(since=time.time() - HOT_REPLAY)
            self._task = asyncio.get_running_loop().create_task(self._count_changes(stream))

    async def _subscribe(self, since: float | None = None) -> AsyncIterator[Change] | None:
        stream = None
        try:
            stream = self.bus.watch(WatchRequest("", since=since))  # since None: live changes only
            await asyncio.wait_for(ensure_subscribed(stream), self.gw.config.ready_timeout)
        except Exception as e:  # noqa: BLE001 - counted as "not watching"; retried later
            await _close_stream(stream)
            self._watching = False
            self.watch_error = f"{type(e).__name__}: {e}"
            return None
        self._watching = True
        self.watch_error = None
        return stream

    def _sample(self) -> None:
        c = self.bus.coordinator.counters
        self.rates.sample(time.time(), c.get("commits_1pc", 0) + c.get("commits_2pc", 0), c.get("conflicts", 0))

    async def _sample_forever(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            next_at += SAMPLE_INTERVAL
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            self._sample()

    async def _count_changes(self, stream: AsyncIterator[Change] | None) -> None:
        """Count every committed write per key, at its commit time; resubscribe (live only)
        when the watch ends or fails — a lagged watch loses counts, never the dashboard."""
        while True:
            if stream is not None:
                try:
                    async for change in stream:
                        if not change.key.startswith(HIDDEN_PREFIXES):
                            self.hot.add(change.key, min(change.committed_at, time.time()))
                    self.watch_error = "the watch ended (a shard shut down); resubscribing"
                except Exception as e:  # noqa: BLE001 - whatever ended it, watch again
                    self.watch_error = f"{type(e).__name__}: {e}; resubscribing"
                finally:
                    self._watching = False
                    await _close_stream(stream)
            await asyncio.sleep(WATCH_RETRY)
            stream = await self._subscribe()

    async def close(self) -> None:
        self._closed = True
        for task in (self._task, self._sampler):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._task = self._sampler = None


async def _close_stream(stream: object) -> None:
    close = getattr(stream, "aclose", None) or getattr(stream, "close", None)
    if close is None:
        return
    with contextlib.suppress(Exception):
        r = close()
        if asyncio.iscoroutine(r):
            await r
