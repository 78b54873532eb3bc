"""Recording what a test's agents do through the SDK, as a history the checker reads.

``Recording.wrap(bus)`` puts a ``RecordingBus`` in front of any ``BusService`` (the
embedded engine's ``Bus``, or a ``RemoteBus``); every session over it is recorded
(``specs/history.md``), whatever API its agent uses (``get``, ``commit``, transactions,
``run``):

- a read (``get``, ``get_many``, a transaction's read) is a read-only transaction:
  ``["r", key, value, version]`` for each key it returned;
- a commit is a transaction of the reads the server validates it against, then its
  writes (``["w", key, value]``, a delete writes ``null``): in transaction scope the
  transaction's own reads (the request's read entries), in session scope every key
  the session was delivered and has not forgotten (its latest delivery, its own
  commits counting as reads at their new versions), plus ``expect`` entries;
- outcomes: ``ok`` with the new versions; ``fail`` for a refusal (Conflict,
  SessionExpired, InvalidRequest, ...); a commit that raised ``Unavailable`` stays
  open and is resolved by a resend with the same commit id, else it ends ``info``
  (outcome unknown) when the history is checked.

``capture_final(bus)`` reads every key the agents touched, with its kept history, as
the history's ``final`` event (durability and version-order checks), and ``check()``
runs ``oribus.checker.check``. ``capturing()`` makes every ``AsyncSession`` created
meanwhile recorded (``oribus.open_local``, ``oribus.connect``, ``oribus.Client``,
``bus.session(...)``): the ``oribus_history`` fixture uses it.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from oribus.checker import Recorder, Report, check
from oribus.checker.history import READ, WRITE
from oribus.client.session import AsyncSession
from oribus.contract import BusService, CommitRequest, CommitResult, Entry, ReadResult
from oribus.errors import OribusError, Unavailable
from oribus.messages import Change, ReadItem, Scope, WatchRequest
from oribus.types import DEFAULT_SCAN_LIMIT, SessionRef, decode_value

# A gate a bus call passes before it is sent: an async context manager factory that
# ``oribus.testing.interleave`` uses to run one call at a time in the order it picks.
Gate = Callable[[str], contextlib.AbstractAsyncContextManager[None]]

_FINAL_SESSION = SessionRef("oribus-testing", "final")


def _plain(value: Any) -> Any:
    """A value as JSON holds it (the history is JSON): bytes and other types by their repr."""
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)
    return value


def _decode(raw: bytes | None) -> Any:
    return None if raw is None else _plain(decode_value(raw))


@contextlib.asynccontextmanager
async def _no_gate(what: str) -> AsyncIterator[None]:
    yield


class Recording:
    """The history of every session over the buses it wrapped.

    Example::

        recording = Recording()
        engine = await EmbeddedEngine.open(EngineConfig(data_dir=path))
        bus = AsyncSession(recording.wrap(engine.bus), "alice")
        ...                                   # the agents run
        await recording.capture_final(engine.bus)
        report = recording.check()
        assert report.ok, recording.failure(report)
    """

    def __init__(self) -> None:
        self.recorder = Recorder()
        self._lock = threading.Lock()  # the sync client calls from its loop thread
        self._values: dict[tuple[str, int], Any] = {}  # what each version of each key holds
        self._delivered: dict[SessionRef, dict[str, int]] = {}  # per session: key -> version
        self._open_commits: dict[str, tuple[int, list[list[Any]]]] = {}  # commit id -> (tid, ops)
        self.keys: set[str] = set()
        self.buses: list[RecordingBus] = []
        self._checked: Report | None = None

    # ---- wiring -----------------------------------------------------------------------

    def wrap(self, bus: BusService, gate: Gate | None = None, process: str | None = None) -> RecordingBus:
        """A bus that records every call of the sessions over it; ``gate`` as for ``RecordingBus``."""
        recording_bus = RecordingBus(bus, self, gate, process)
        self.buses.append(recording_bus)
        return recording_bus

    @contextlib.contextmanager
    def capturing(self) -> Iterator[Recording]:
        """Record every ``AsyncSession`` created inside the block (every SDK entry point makes one)."""
        original = AsyncSession.__init__
        recording = self

        def init(session: AsyncSession, bus: BusService, *args: Any, **kwargs: Any) -> None:
            if not isinstance(bus, RecordingBus):
                bus = recording.wrap(bus)
            original(session, bus, *args, **kwargs)

        setattr(AsyncSession, "__init__", init)  # noqa: B010 - a method, restored below
        try:
            yield self
        finally:
            setattr(AsyncSession, "__init__", original)  # noqa: B010

    # ---- what the buses report ------------------------------------------------------------

    def _value(self, key: str, version: int) -> tuple[bool, Any]:
        if version == 0:
            return True, None
        with self._lock:
            if (key, version) in self._values:
                return True, self._values[(key, version)]
        return False, None

    def read_started(self, session: SessionRef, keys: list[str], process: str) -> int | None:
        keys = list(dict.fromkeys(keys))
        if not keys:
            return None
        return self.recorder.invoke(process, list(session), [[READ, k, None] for k in keys])

    def read_done(self, tid: int | None, session: SessionRef, result: ReadResult, record: bool,
                  only_new: bool) -> None:
        skipped = set(result.skipped)
        ops: list[list[Any]] = []
        seen: set[str] = set()
        with self._lock:
            delivered = self._delivered.setdefault(session, {})
            for item in result.items:
                value = _decode(item.value)
                self._values[(item.key, item.version)] = value
                self.keys.add(item.key)
                if item.key not in seen:
                    seen.add(item.key)
                    ops.append([READ, item.key, value, item.version])
                if record and item.key not in skipped and not (only_new and item.value is None):
                    delivered[item.key] = item.version  # a registration records existing keys only
        if tid is not None:
            self.recorder.ok(tid, ops, None)

    def read_failed(self, tid: int | None, error: BaseException) -> None:
        if tid is not None:
            self.recorder.fail(tid, getattr(error, "code", type(error).__name__))

    def commit_ops(self, req: CommitRequest, reads: dict[str, int], rolled_back: dict[str, Any]
                   ) -> list[list[Any]]:
        """The micro-ops of a commit: the reads the server validates it against, then its writes."""
        ops: list[list[Any]] = []
        for key, version in reads.items():
            known, _ = self._value(key, version)
            if known:  # a version this recording never saw cannot be described: left out
                ops.append([READ, key, None])
        ops.extend([WRITE, key, _decode(raw)] for key, raw in req.writes.items())
        ops.extend([WRITE, key, value] for key, value in rolled_back.items())
        self.keys.update(op[1] for op in ops)
        return ops

    def commit_started(self, req: CommitRequest, ops: list[list[Any]], process: str) -> int | None:
        with self._lock:
            pending = self._open_commits.get(req.commit_id)
        if pending is not None:
            return pending[0]  # a resend of a commit whose outcome was unknown: the same transaction
        if not ops:
            return None
        tid = self.recorder.invoke(process, list(req.session), ops)
        with self._lock:
            self._open_commits[req.commit_id] = (tid, ops)
        return tid

    def commit_done(self, tid: int | None, req: CommitRequest, result: CommitResult,
                    reads: dict[str, int]) -> None:
        with self._lock:
            tid_ops = self._open_commits.pop(req.commit_id, None)
        ops = tid_ops[1] if tid_ops is not None else []
        done: list[list[Any]] = []
        for f, key, arg in ops:
            if f == READ:
                version = reads[key]
                done.append([READ, key, self._value(key, version)[1], version])
            else:
                done.append([f, key, arg, result.versions.get(key)])
        with self._lock:
            delivered = self._delivered.setdefault(req.session, {})
            for f, key, arg, version in done:
                if f == WRITE and version is not None:
                    self._values[(key, version)] = arg
                    delivered[key] = version  # a session's own commit counts as read at its version
        if tid is not None:
            self.recorder.ok(tid, done, req.commit_id)

    def commit_failed(self, tid: int | None, req: CommitRequest, error: BaseException) -> None:
        if tid is None:
            return
        if isinstance(error, Unavailable) or not isinstance(error, OribusError):
            return  # outcome unknown: open until a resend settles it, else info when checked
        with self._lock:
            self._open_commits.pop(req.commit_id, None)
        self.recorder.fail(tid, error.code, req.commit_id)

    def forgot(self, session: SessionRef, keys: list[str]) -> None:
        with self._lock:
            delivered = self._delivered.get(session, {})
            for key in keys:
                delivered.pop(key, None)

    def was_reset(self, session: SessionRef) -> None:
        with self._lock:
            self._delivered.pop(session, None)

    def read_set_of(self, req: CommitRequest) -> dict[str, int]:
        """What the server validates ``req`` against: in transaction scope its read entries,
        in session scope also the session's deliveries; and its expected versions."""
        with self._lock:
            reads = {} if req.scope == Scope.TRANSACTION else dict(self._delivered.get(req.session, {}))
        reads.update(req.read_set)
        for key, version in req.expect.items():
            reads.setdefault(key, version)
        return reads

    # ---- the end of a run --------------------------------------------------------------

    async def capture_final(self, bus: BusService) -> None:
        """Read every key the agents touched, and its kept history, into the ``final`` event.
        Call it once the agents are done, on the bus itself (not a recording one)."""
        if isinstance(bus, RecordingBus):
            bus = bus.inner
        keys = sorted(self.keys)
        state: dict[str, list[Any]] = {}
        history: dict[str, list[list[Any]]] = {}
        for i in range(0, len(keys), 256):
            result = await bus.read(_FINAL_SESSION, keys[i:i + 256], False)
            for item in result.items:
                state[item.key] = [_decode(item.value), item.version]
        for key in keys:
            entries = await bus.history(key)
            history[key] = [[e.version, e.commit_id, _decode(e.value)]
                            for e in sorted(entries, key=lambda e: e.version)]
        self.recorder.final(state, history)

    def close_open_commits(self) -> None:
        """End every commit whose outcome is still unknown as ``info``."""
        with self._lock:
            still_open = list(self._open_commits.items())
            self._open_commits.clear()
        for commit_id, (tid, _ops) in still_open:
            self.recorder.info(tid, "Unavailable", commit_id)

    def check(self) -> Report:
        """Check the history recorded so far (``oribus.checker.check``)."""
        self.close_open_commits()
        return check(self.recorder.events)

    def failure(self, report: Report, limit: int = 4) -> str:
        """What a failed test says: each anomaly class, and one minimal example of each."""
        lines = [f"the history of this test's agents has {len(report.anomalies)} anomalies "
                 f"({', '.join(f'{k} x{n}' for k, n in report.by_kind().items())}):"]
        for kind, anomaly in sorted(report.examples().items()):
            lines.append(f"  {kind} [{anomaly.category}]: {anomaly.message}")
            lines.extend(f"    {describe_txn(t)}" for t in anomaly.ops[:limit])
        lines.append(f"checked: {report.counts.get('committed', 0)} committed transactions over "
                     f"{report.counts.get('keys', 0)} keys")
        return "\n".join(lines)

    def dump(self, path: str) -> None:
        """Write the history as JSON lines (``oribus check PATH`` reads it)."""
        self.recorder.dump(path)


def describe_txn(t: dict[str, Any]) -> str:
    """One transaction of an anomaly on one line: who, how it ended, its reads and writes."""
    ops = []
    for op in t.get("ops", []):
        version = f" @v{op[3]}" if len(op) > 3 and op[3] is not None else ""
        ops.append(f"{'read' if op[0] == READ else 'write'} {op[1]} = {json.dumps(op[2])}{version}")
    return f"T{t.get('id')} ({t.get('process')}, {t.get('outcome')}): " + "; ".join(ops)


class RecordingBus(BusService):
    """A ``BusService`` that records its sessions' calls into a ``Recording``.

    ``gate(what)``, when given, is entered around every call that reads or changes what
    the server validates (read, commit, forget, reset): ``oribus.testing.interleave``
    holds a call there until its turn. ``inner`` may be replaced (an engine restarted).
    """

    def __init__(self, inner: BusService, recording: Recording, gate: Gate | None = None,
                 process: str | None = None) -> None:
        self.inner = inner
        self.recording = recording
        self.gate: Gate = gate or _no_gate
        self.process = process

    def _process(self, session: SessionRef) -> str:
        return self.process or session.agent

    async def read(self, session: SessionRef, keys: list[str], record: bool = True,
                   only_new: bool = False) -> ReadResult:
        async with self.gate(f"read {', '.join(keys)}"):
            tid = self.recording.read_started(session, list(keys), self._process(session))
            try:
                result = await self.inner.read(session, keys, record, only_new)
            except BaseException as e:
                self.recording.read_failed(tid, e)
                raise
            self.recording.read_done(tid, session, result, record, only_new)
            return result

    async def _rolled_back(self, req: CommitRequest) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, version in req.rollback.items():
            known, value = self.recording._value(key, version)
            if not known:
                entries = await self.inner.history(key)
                value = next((_decode(e.value) for e in entries if e.version == version), None)
            out[key] = value
        return out

    async def commit(self, req: CommitRequest) -> CommitResult:
        async with self.gate(f"commit {', '.join([*req.writes, *req.rollback])}"):
            reads = self.recording.read_set_of(req)
            ops = self.recording.commit_ops(req, reads, await self._rolled_back(req) if req.rollback else {})
            tid = self.recording.commit_started(req, ops, self._process(req.session))
            try:
                result = await self.inner.commit(req)
            except BaseException as e:
                self.recording.commit_failed(tid, req, e)
                raise
            self.recording.commit_done(tid, req, result, reads)
            return result

    async def forget(self, session: SessionRef, keys: list[str]) -> bool | None:
        async with self.gate(f"forget {', '.join(keys)}"):
            answer = await self.inner.forget(session, keys)
            self.recording.forgot(session, keys)
            return answer

    async def reset(self, session: SessionRef) -> bool | None:
        async with self.gate("reset"):
            answer = await self.inner.reset(session)
            self.recording.was_reset(session)
            return answer

    async def history(self, key: str, limit: int | None = None) -> list[Entry]:
        return await self.inner.history(key, limit)

    async def stats(self) -> dict:
        return await self.inner.stats()

    async def scan(self, prefix: str = "", after: str = "", limit: int = DEFAULT_SCAN_LIMIT) -> list[ReadItem]:
        return await self.inner.scan(prefix, after, limit)

    def watch(self, request: WatchRequest) -> AsyncIterator[Change]:
        return self.inner.watch(request)
