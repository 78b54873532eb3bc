"""The proxy's side of the bus: keeping the key index fed, and recording deliveries.

``IndexFeed`` fills a ``KeyIndex`` from the bus: a watch of each prefix (subscribed
first), then a scan of it, then the watch's changes as they come; the whole is done
again every ``refresh_seconds`` and after the watch fails, and while the bus is down
the index keeps what it knew.

``DeliveryRecorder.record(session, refs)`` makes the references an exchange made
deliveries to the agent's session, with skip-if-exists semantics
(``AsyncSession.register``): a key the session was given before keeps that delivery,
however old, so its next commit is still checked against what it was given first.

**When what the agent saw is older than what can be recorded.** A read records the
*current* version. If a reference names an older one — the agent pasted the value of
version 3 and the key is at 5 — recording 5 would let a commit pass that ORI must
refuse. The recorder then fails the session closed: it reads, as that session, the
session's *lost key* ``.oribus-proxy/lost/<hash of agent and session>`` and writes a new
version of it from a session of its own, so the session holds a stale delivery and its
next commit in session scope is refused with Conflict (``stale_read`` on that key; its
value says why). The agent recovers as after any lost read: ``reset_session()`` (or
``forget`` the lost key) and read again. This uses nothing but reads and commits, so it
works through every transport and survives a bus restart as the session's other
deliveries do.

**When the bus cannot be reached** the LLM call goes on regardless. The exchange's
references are kept, per session in order, with the version the index had for each at
that time, and retried every ``retry_seconds``; a key found at another version than
the one kept (it changed while the bus was away), or a queue that overflowed
``max_pending`` references, fails the session closed as above once the bus answers.
What this cannot cover, and is documented so: a commit of that agent that reaches the
bus after it is back but before the retry (at most ``retry_seconds`` later), and the
references kept by a proxy that stops before the bus is back.

**Where the proxy's deliveries are checked.** A session-scope commit is checked on every
shard the session holds a token for: the tokens its client sends (an SDK client sends
those of its own reads) and those the bus keeps in its session table. The proxy's reads
leave their tokens in the bus's table, not in the agent's client; the bus journals them
(a registration is journaled as an HTTP agent's read is), so a shard on which only the
proxy recorded is checked when the agent commits through the bus the proxy records on,
also after that bus restarted
(tests/e2e/test_registered_reads_survive_a_bus_restart.py) — but not through another bus
replica, whose journal is its own (as for HTTP agents: pin an agent to one bus).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field

from oribus.client.session import AsyncSession
from oribus.client.watch import WatchStream
from oribus.errors import InvalidRequest, OribusError
from oribus.integrations.proxy.detect import KeyIndex, Ref
from oribus.types import MAX_KEYS_PER_REQUEST, SessionRef

log = logging.getLogger("oribus.proxy")

LOST_PREFIX = ".oribus-proxy/lost/"
PROXY_AGENT = "oribus-proxy"
DEFAULT_RETRY_SECONDS = 1.0
DEFAULT_MAX_PENDING = 10_000  # references kept per session while the bus is down
DEFAULT_REFRESH_SECONDS = 60.0
_SCAN_PAGE = 1000


def lost_key(session: SessionRef) -> str:
    """The key whose stale delivery fails ``session`` closed (see the module docstring)."""
    digest = hashlib.sha256(f"{session[0]}\0{session[1]}".encode()).hexdigest()[:32]
    return f"{LOST_PREFIX}{digest}"


@dataclass(slots=True)
class _Pending:
    refs: list[Ref] = field(default_factory=list)
    overflowed: bool = False


@dataclass(slots=True)
class RecorderCounters:
    recorded: int = 0  # deliveries recorded
    skipped: int = 0  # references to keys the session had been given already
    stale: int = 0  # references to an older version than the one that could be recorded
    failed_closed: int = 0  # sessions failed closed
    bus_errors: int = 0  # recordings that did not reach the bus (kept and retried)

    def as_dict(self) -> dict[str, int]:
        return {f: getattr(self, f) for f in self.__slots__}


class DeliveryRecorder:
    """Records references as deliveries to agents' sessions (see the module docstring).

    ``bus`` is any session on the bus (``oribus.connect`` or ``oribus.open_local``); the
    recorder opens the agents' sessions beside it (``bus.session(agent, session_id)``).
    """

    def __init__(self, bus: AsyncSession, *, timeout: float = 2.0, retry_seconds: float = DEFAULT_RETRY_SECONDS,
                 max_pending: int = DEFAULT_MAX_PENDING) -> None:
        self.bus = bus
        self.timeout = timeout
        self.retry_seconds = retry_seconds
        self.max_pending = max_pending
        self.counters = RecorderCounters()
        self._pending: dict[SessionRef, _Pending] = {}
        self._retry: asyncio.Task[None] | None = None
        self._locks: dict[SessionRef, list] = {}  # session -> [lock, holders and waiters]

    @property
    def pending_sessions(self) -> int:
        return len(self._pending)

    async def record(self, session: SessionRef, refs: Iterable[Ref]) -> None:
        """Record ``refs`` for ``session``; never raises for the bus's sake (an unreachable
        bus keeps them for later, see the module docstring)."""
        refs = list(refs)
        if not refs:
            return
        async with self._turn(session):  # one session's exchanges are recorded in the order they came
            if session in self._pending:  # keep order behind what is waiting for the bus
                self._keep(session, refs)
                return
            try:
                await asyncio.wait_for(self._apply(session, refs, later=False), self.timeout)
            except InvalidRequest as e:  # not a session the bus takes (a name too long): nothing to keep
                log.warning("references of %s not recorded: %s", session, e)
            except (OribusError, TimeoutError, OSError) as e:
                self.counters.bus_errors += 1
                log.warning("could not record %d references of session %s (%s: %s); kept, retried every %g s",
                            len(refs), session, type(e).__name__, e, self.retry_seconds)
                self._keep(session, refs)

    @contextlib.asynccontextmanager
    async def _turn(self, session: SessionRef) -> AsyncIterator[None]:
        """Hold ``session``'s lock; the lock is dropped when nobody holds or awaits it."""
        entry = self._locks.get(session)
        if entry is None:
            entry = self._locks[session] = [asyncio.Lock(), 0]
        entry[1] += 1
        try:
            async with entry[0]:
                yield
        finally:
            entry[1] -= 1
            if entry[1] == 0:
                del self._locks[session]

    def _keep(self, session: SessionRef, refs: list[Ref]) -> None:
        p = self._pending.setdefault(session, _Pending())
        if p.overflowed or len(p.refs) + len(refs) > self.max_pending:
            p.overflowed, p.refs = True, []
        else:
            p.refs.extend(refs)
        if self._retry is None or self._retry.done():
            self._retry = asyncio.create_task(self._retry_loop(), name="oribus-proxy-retry")

    async def _apply(self, session: SessionRef, refs: list[Ref], *, later: bool) -> None:
        """Record ``refs``. ``later``: they were kept while the bus was away, so a name
        reference also names the version the index had then."""
        seen: dict[str, set[int]] = {}
        for r in refs:
            versions = seen.setdefault(r.key, set())
            if r.version is not None and (later or r.how == "value"):
                versions.add(r.version)
        keys = list(seen)
        agent = self.bus.session(session[0], session[1])
        stale: list[str] = []
        for i in range(0, len(keys), MAX_KEYS_PER_REQUEST):
            got = await agent.register(keys[i:i + MAX_KEYS_PER_REQUEST])
            self.counters.recorded += len(got.recorded)
            self.counters.skipped += len(got.skipped)
            for key, item in got.recorded.items():
                if seen[key] and item.version not in seen[key]:
                    stale.append(f"{key} (saw version {max(seen[key])}, recorded {item.version})")
        if stale:
            self.counters.stale += len(stale)
            await self.fail_closed(session, "its LLM traffic showed older versions than could be recorded: "
                                   + ", ".join(stale[:10]))

    async def fail_closed(self, session: SessionRef, reason: str) -> None:
        """Make the next session-scope commit of ``session`` fail (Conflict on its lost key)."""
        key = lost_key(session)
        await self.bus.session(session[0], session[1]).get(key)
        await self.bus.session(PROXY_AGENT, uuid.uuid4().hex[:16]).commit({key: {
            "agent": session[0], "session": session[1], "reason": reason, "at": time.time(),
            "recover": "reset the session (or forget this key) and read again",
        }})
        self.counters.failed_closed += 1
        log.warning("session %s failed closed: %s", session, reason)

    async def _retry_loop(self) -> None:
        while self._pending:
            await asyncio.sleep(self.retry_seconds)
            for session in list(self._pending):
                async with self._turn(session):
                    p = self._pending.get(session)
                    if p is None:
                        continue
                    try:
                        if p.overflowed:
                            await asyncio.wait_for(self.fail_closed(
                                session, "more references than the proxy keeps were made while the bus "
                                "was unreachable"), self.timeout)
                        else:
                            await asyncio.wait_for(self._apply(session, p.refs, later=True), self.timeout)
                    except InvalidRequest as e:
                        log.warning("references of %s not recorded: %s", session, e)
                    except (OribusError, TimeoutError, OSError):
                        break  # still away: try again later, every session in its turn
                    del self._pending[session]
                    log.info("recorded the references kept for session %s", session)

    async def close(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._retry
        if self._pending:
            log.warning("references of %d sessions were never recorded (bus unreachable): %s",
                        len(self._pending), ", ".join(map(str, list(self._pending)[:10])))


class IndexFeed:
    """Keeps ``index`` fed from ``bus`` for each prefix (see the module docstring)."""

    def __init__(self, bus: AsyncSession, index: KeyIndex, prefixes: Iterable[str] = ("",), *,
                 refresh_seconds: float = DEFAULT_REFRESH_SECONDS, retry_seconds: float = DEFAULT_RETRY_SECONDS) -> None:
        self.bus = bus
        self.index = index
        self.prefixes = list(prefixes) or [""]
        self.refresh_seconds = refresh_seconds
        self.retry_seconds = retry_seconds
        self.scans = 0  # complete scans of every prefix
        self._tasks: list[asyncio.Task[None]] = []
        self._scanned = asyncio.Event()

    async def start(self, wait: float = 0.0) -> None:
        """Start feeding; wait up to ``wait`` seconds for the first scan of every prefix."""
        done: list[asyncio.Event] = []
        for prefix in self.prefixes:
            ev = asyncio.Event()
            done.append(ev)
            self._tasks.append(asyncio.create_task(self._feed(prefix, ev), name=f"oribus-proxy-index:{prefix}"))
        if wait > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*(e.wait() for e in done)), wait)

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks.clear()

    async def _feed(self, prefix: str, scanned: asyncio.Event) -> None:
        while True:
            try:
                watch = self.bus.watch(prefix)
                await watch.start()
                try:
                    await self._scan(prefix)
                    scanned.set()
                    self.scans += 1
                    await asyncio.wait_for(self._follow(watch), self.refresh_seconds)
                finally:
                    await watch.aclose()
                await asyncio.sleep(self.retry_seconds)  # the watch ended (the bus closed): not in a busy loop
            except TimeoutError:
                continue  # time to scan again
            except Exception as e:  # noqa: BLE001 - the index keeps what it knew and the proxy serves on
                log.warning("key index of prefix %r: %s: %s; retrying in %g s", prefix, type(e).__name__, e,
                            self.retry_seconds)
                await asyncio.sleep(self.retry_seconds)

    async def _scan(self, prefix: str) -> None:
        after = ""
        while True:
            page = await self.bus.scan(prefix, after=after, limit=_SCAN_PAGE)
            for item in page:
                self.index.put(item.key, item.version, item.value)
            if len(page) < _SCAN_PAGE:
                return
            after = page[-1].key

    async def _follow(self, watch: WatchStream) -> None:
        async for ch in watch:
            if ch.deleted:
                self.index.delete(ch.key, ch.version)
            else:
                self.index.put(ch.key, ch.version, ch.value)

