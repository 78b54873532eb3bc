"""Recorded histories: the event model, JSON-lines reading and writing, and the Recorder.

A history is what the clients of a checked run saw, one event per line, in the
order the recorder saw them (``specs/history.md``)::

    {"type": "invoke", "id": 17, "process": "c3", "session": ["agent-3", "s1"], "time": 12.001,
     "ops": [["r", "k1", null], ["append", "k2", 40]]}
    {"type": "ok", "id": 17, "time": 12.009, "commit_id": "c3-17",
     "ops": [["r", "k1", [3, 7], 4], ["append", "k2", 40, 6]]}
    {"type": "fail", "id": 18, "time": 12.020, "error": "Conflict"}
    {"type": "info", "id": 19, "time": 12.050, "error": "Unavailable", "commit_id": "c3-19"}
    {"type": "final", "state": {"k1": [[3, 7, 9], 5]}, "history": {"k1": [[5, "c3-20", [3, 7, 9]]]}}

Micro-operations: ``["r", key, null]`` reads, ``["append", key, element]``
appends a unique element to the list at key, ``["w", key, value]`` writes a
register. ``ok`` repeats them with results: the value and version a read saw,
the version a write created (``null`` when the server did not say).

Line order is real-time order: one recorder per run appends every event under
a lock at the moment the client saw it, so "T's ok comes before U's invoke"
means T completed before U began. ``time`` is informational.

``read_history`` validates every line and raises ``HistoryError`` (with the
line number) on anything malformed; ``transactions`` pairs each invoke with its
completion into a ``Txn``. An invoke without a completion (the client crashed)
is treated as ``info``: its outcome is unknown.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

READ = "r"
APPEND = "append"
WRITE = "w"
OP_KINDS = (READ, APPEND, WRITE)
EVENT_TYPES = ("invoke", "ok", "fail", "info", "final")


class HistoryError(ValueError):
    """A history that cannot be read or does not follow ``specs/history.md``."""


# ---- the transaction view of a history ---------------------------------------------------


@dataclass(eq=False)
class Txn:
    """One transaction of a history: its invoke paired with its completion.

    ``ops`` are lists ``[f, key, arg, result]``: for ``ok`` transactions
    ``arg``/``result`` are what the client saw (a read: value and version; a
    write: the element or value and the version it created); for the others
    the invoked ops with ``result`` None. ``invoke_index``/``complete_index``
    are event positions (real-time order); ``complete_index`` is None when the
    transaction never completed or its outcome is unknown.
    """

    id: int
    process: str
    outcome: str  # "ok" | "fail" | "info"
    ops: list[list[Any]]
    invoke_index: int
    complete_index: int | None = None
    commit_id: str | None = None
    error: str | None = None

    def writes(self) -> list[list[Any]]:
        return [op for op in self.ops if op[0] != READ]

    def describe(self) -> dict[str, Any]:
        """A JSON-friendly description (used in anomaly reports)."""
        return {
            "id": self.id,
            "process": self.process,
            "outcome": self.outcome,
            "commit_id": self.commit_id,
            "ops": self.ops,
        }

    def __repr__(self) -> str:
        return f"<Txn {self.id} {self.outcome} {self.commit_id or ''} {self.ops}>"


@dataclass
class Final:
    """The servers' state at the end of a run: value and version per key, and each key's kept history."""

    state: dict[str, tuple[Any, int]] = field(default_factory=dict)
    history: dict[str, list[tuple[int, str | None, Any]]] = field(default_factory=dict)  # oldest first


def transactions(events: Sequence[Mapping[str, Any]], *, validated: bool = False
                 ) -> tuple[list[Txn], Final | None]:
    """Pair invokes with completions (validating the history unless ``validated``, as
    ``read_history`` does); returns (txns, final event or None)."""
    if not validated:
        validate(events)
    txns: dict[int, Txn] = {}
    final: Final | None = None
    for index, ev in enumerate(events):
        kind = ev["type"]
        if kind == "invoke":
            txns[ev["id"]] = Txn(
                id=ev["id"],
                process=str(ev.get("process", "")),
                outcome="info",
                ops=[[op[0], op[1], op[2], None] for op in ev["ops"]],
                invoke_index=index,
                error="no completion",
            )
        elif kind == "final":
            final = Final(
                state={k: (v[0], v[1]) for k, v in ev.get("state", {}).items()},
                history={
                    k: sorted(((e[0], e[1], e[2]) for e in entries), key=lambda e: e[0])
                    for k, entries in ev.get("history", {}).items()
                },
            )
        else:
            t = txns[ev["id"]]
            t.outcome = kind
            t.commit_id = ev.get("commit_id", t.commit_id)
            if kind == "ok":
                t.ops = [list(op) for op in ev["ops"]]
                t.complete_index = index
                t.error = None
            else:
                t.error = ev.get("error")
    return list(txns.values()), final


# ---- validation ------------------------------------------------------------------------------


def _op_ok(op: Any, completed: bool) -> bool:
    if not isinstance(op, list) or len(op) != (4 if completed else 3):
        return False
    if op[0] not in OP_KINDS or not isinstance(op[1], str):
        return False
    if completed and op[3] is not None and (not isinstance(op[3], int) or isinstance(op[3], bool)):
        return False
    return True


def validate(events: Sequence[Mapping[str, Any]], lines: Sequence[int] | None = None) -> None:
    """Raise HistoryError unless ``events`` is a well-formed history.

    The error names the event (counted from 1), or its line when ``lines``
    gives each event's line number.
    """
    pending: dict[int, list[list[Any]]] = {}
    seen: set[int] = set()
    finals = 0
    for n, ev in enumerate(events, 1):
        def bad(msg: str, n: int = n) -> HistoryError:
            return HistoryError(f"line {lines[n - 1]}: {msg}" if lines else f"event {n}: {msg}")

        if not isinstance(ev, Mapping):
            raise bad("not a JSON object")
        kind = ev.get("type")
        if kind not in EVENT_TYPES:
            raise bad(f"unknown type {kind!r} (expected one of {', '.join(EVENT_TYPES)})")
        if kind == "final":
            finals += 1
            if finals > 1:
                raise bad("a history has at most one final event")
            state, hist = ev.get("state", {}), ev.get("history", {})
            if not isinstance(state, Mapping) or not all(
                isinstance(v, list) and len(v) == 2 and isinstance(v[1], int) for v in state.values()
            ):
                raise bad("final.state must map key -> [value, version]")
            if not isinstance(hist, Mapping) or not all(
                isinstance(es, list) and all(isinstance(e, list) and len(e) == 3 and isinstance(e[0], int)
                                             for e in es)
                for es in hist.values()
            ):
                raise bad("final.history must map key -> [[version, commit_id, value], ...]")
            continue
        tid = ev.get("id")
        if not isinstance(tid, int) or isinstance(tid, bool):
            raise bad("id must be an integer")
        if kind == "invoke":
            if tid in seen:
                raise bad(f"transaction {tid} invoked twice")
            ops = ev.get("ops")
            if not isinstance(ops, list) or not ops or not all(_op_ok(op, False) for op in ops):
                raise bad('invoke.ops must be a non-empty list of ["r"|"append"|"w", key, arg]')
            seen.add(tid)
            pending[tid] = ops
            continue
        if tid not in pending:
            raise bad(f"{kind} of transaction {tid}, which is not invoked or already completed")
        invoked = pending.pop(tid)
        if kind == "ok":
            ops = ev.get("ops")
            if not isinstance(ops, list) or not all(_op_ok(op, True) for op in ops):
                raise bad('ok.ops must be a list of [f, key, value/element, version or null]')
            if len(ops) != len(invoked) or any(
                a[0] != b[0] or a[1] != b[1] or (a[0] != READ and a[2] != b[2])
                for a, b in zip(ops, invoked, strict=True)
            ):
                raise bad(f"ok.ops of transaction {tid} do not match its invoked ops")
        cid = ev.get("commit_id")
        if cid is not None and not isinstance(cid, str):
            raise bad("commit_id must be a string")


# ---- JSON lines ----------------------------------------------------------------------------


def read_history(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read and validate a JSONL history; HistoryError names the file and line of any problem."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except (OSError, UnicodeDecodeError) as e:
        raise HistoryError(f"{path}: cannot read: {e}") from e
    events: list[dict[str, Any]] = []
    numbers: list[int] = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            events.append(json.loads(line))
        except ValueError as e:
            raise HistoryError(f"{path}:{n}: not JSON: {e}") from e
        numbers.append(n)
    try:
        validate(events, numbers)
    except HistoryError as e:
        raise HistoryError(f"{path}: {e}") from None
    return events


def write_history(events: Iterable[Mapping[str, Any]], path: str | os.PathLike) -> None:
    """Write events as JSON lines (to a temporary file first, then renamed into place)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for ev in events:
            f.write(json.dumps(ev, separators=(",", ":")) + "\n")
    os.replace(tmp, path)


# ---- recording -----------------------------------------------------------------------------


class Recorder:
    """Records a run's history as clients see it; thread-safe, cheap enough to call from asyncio.

    Example::

        rec = Recorder()
        tid = rec.invoke("c1", session.session_ref, [["r", "k1", None], ["append", "k1", 7]])
        ...                                   # run the transaction
        rec.ok(tid, [["r", "k1", [3], 2], ["append", "k1", 7, 3]], commit_id=tx.commit_id)
        rec.dump("history.jsonl")

    Call ``fail`` when the transaction certainly did not commit and ``info``
    when its outcome is unknown. Every call appends one event under a lock, so
    the event order is the order the clients saw things happen.
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._events: list[dict[str, Any]] = []
        self._next_id = 1
        self._pending: set[int] = set()

    def invoke(self, process: str, session: Sequence[str] | None, ops: Sequence[Sequence[Any]]) -> int:
        ops = [list(op) for op in ops]
        if not ops or not all(_op_ok(op, False) for op in ops):
            raise ValueError(f"invalid ops {ops!r}")
        with self._lock:
            tid = self._next_id
            self._next_id += 1
            self._pending.add(tid)
            self._events.append({
                "type": "invoke", "id": tid, "process": str(process),
                "session": list(session) if session is not None else None,
                "time": self._clock(), "ops": ops,
            })
        return tid

    def _complete(self, tid: int, event: dict[str, Any]) -> None:
        with self._lock:
            if tid not in self._pending:
                raise ValueError(f"transaction {tid} is not invoked or already completed")
            self._pending.discard(tid)
            event["time"] = self._clock()
            self._events.append(event)

    def ok(self, tid: int, ops: Sequence[Sequence[Any]], commit_id: str | None) -> None:
        self._complete(tid, {"type": "ok", "id": tid, "commit_id": commit_id, "ops": [list(op) for op in ops]})

    def fail(self, tid: int, error: str, commit_id: str | None = None) -> None:
        event: dict[str, Any] = {"type": "fail", "id": tid, "error": str(error)}
        if commit_id is not None:
            event["commit_id"] = commit_id
        self._complete(tid, event)

    def info(self, tid: int, error: str, commit_id: str | None = None) -> None:
        self._complete(tid, {"type": "info", "id": tid, "error": str(error), "commit_id": commit_id})

    def final(self, state: Mapping[str, Sequence[Any]], history: Mapping[str, Sequence[Sequence[Any]]]) -> None:
        """Record what the servers hold at the end: ``{key: [value, version]}``, ``{key: [[version, commit_id, value], ...]}``."""
        with self._lock:
            self._events.append({
                "type": "final",
                "state": {k: list(v) for k, v in state.items()},
                "history": {k: [list(e) for e in es] for k, es in history.items()},
            })

    @property
    def events(self) -> list[dict[str, Any]]:
        """A copy of the events recorded so far."""
        with self._lock:
            return list(self._events)

    def dump(self, path: str | os.PathLike) -> None:
        """Write the history as JSON lines (``oribus check PATH`` reads it)."""
        write_history(self.events, path)
