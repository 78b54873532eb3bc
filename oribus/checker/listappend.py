"""The list-append workload: black-box transactions through the SDK, recorded for ``check``.

Each key holds a list. A transaction is 1-4 micro-operations over a small key
set (8 keys by default, so transactions conflict often): reads, and appends of
a unique element (client index x 1,000,000 + counter). Every list only grows
and every element is written once, so the lists clients read reveal the order
of every append independently of the server's version numbers (Elle's
list-append; Kingsbury & Alvaro 2020).

An append is a read-modify-write in a ``session.transaction()`` (transaction
scope): the transaction reads the key (a recorded ``r`` micro-op, inserted
before the first append of a key it has not read yet), then puts the list with
the element added. So the recorded ops are exactly the reads and writes the
server validated. A transaction reads a key at most once and never after
appending to it.

Outcomes: ``ok`` with each read's value and version (``Item.version``) and each
append's new version (what ``Transaction.commit()`` returned); ``fail`` when the
commit was refused (Conflict, Aborted, SessionExpired, InvalidRequest) or never
sent (a read failed); ``info`` when it was sent and its outcome is unknown
(Unavailable after the SDK's own same-id retries).

Example::

    rec = Recorder()
    sessions = [bus.session(agent=f"client-{i}") for i in range(8)]
    await run_list_append(sessions, rec, txns=1500, seed=7)
    await record_final(bus, rec)
    print(check(rec.events).summary())
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from oribus.checker.history import APPEND, READ, Recorder
from oribus.errors import Conflict, InvalidRequest, OribusError, SessionExpired

DEFAULT_KEYS = 8
DEFAULT_PREFIX = "la/"
ELEMENT_STRIDE = 1_000_000  # element = client index * stride + counter: unique per run
_DEFINITE = (Conflict, SessionExpired, InvalidRequest)  # certainly not committed


def record_failure(recorder: Recorder, tid: int, e: OribusError, sent: bool, commit_id: str | None) -> str:
    """Complete a transaction that raised: ``fail`` if it certainly did not commit (never
    sent, or a definite refusal), else ``info`` (its outcome is unknown). Returns which."""
    if not sent or isinstance(e, _DEFINITE):
        recorder.fail(tid, e.code, commit_id)
        return "fail"
    recorder.info(tid, e.code, commit_id)
    return "info"


def workload_keys(keys: int = DEFAULT_KEYS, prefix: str = DEFAULT_PREFIX) -> list[str]:
    return [f"{prefix}k{i}" for i in range(keys)]


def plan_transaction(rng: random.Random, keys: Sequence[str], next_element: Any, max_ops: int = 4
                     ) -> list[list[Any]]:
    """1..max_ops micro-ops; the read a later append needs is inserted before it (see the module docstring)."""

    def steps() -> Iterator[tuple[str, str]]:
        for _ in range(rng.randint(1, max_ops)):
            key = rng.choice(keys)
            yield (READ if rng.random() < 0.5 else APPEND), key

    return transaction_ops(steps(), next_element)


def transaction_ops(steps: Iterable[tuple[str, str]], next_element: Any) -> list[list[Any]]:
    """The micro-ops of a transaction's ``(kind, key)`` steps: a key is read at most once and
    never after the transaction appended to it, and an append reads its key first."""
    ops: list[list[Any]] = []
    read: set[str] = set()
    appended: set[str] = set()
    for kind, key in steps:
        if key not in read and key not in appended:
            ops.append([READ, key, None])
            read.add(key)
        if kind == APPEND:
            ops.append([APPEND, key, next_element()])
            appended.add(key)
    return ops


async def _run_one(session: Any, recorder: Recorder, process: str, ops: list[list[Any]]) -> str:
    tx = session.transaction()
    tid = recorder.invoke(process, list(session.session_ref), ops)
    results: list[list[Any]] = []
    lists: dict[str, list[Any]] = {}
    try:
        for f, key, arg in ops:
            if f == READ:
                item = await tx.get(key)
                lists[key] = list(item.value) if isinstance(item.value, list) else []
                results.append([READ, key, item.value, item.version])
            else:
                lists[key] = [*lists[key], arg]
                tx.put(key, lists[key])
                results.append([APPEND, key, arg, None])
        versions = await tx.commit()
    except OribusError as e:
        outcome = record_failure(recorder, tid, e, tx.sent, tx.commit_id)
        if isinstance(e, SessionExpired):
            try:
                await session.reset_session()
            except OribusError:
                pass  # the bus is unreachable: the next transaction fails and tries again
        return outcome
    except BaseException as e:
        recorder.info(tid, type(e).__name__, tx.commit_id if tx.sent else None)
        raise
    for op in results:
        if op[0] == APPEND:
            op[3] = versions.get(op[1])
    recorder.ok(tid, results, tx.commit_id)
    return "ok"


async def run_list_append(
    sessions: Sequence[Any],
    recorder: Recorder,
    *,
    txns: int | None = None,
    duration: float | None = None,
    keys: int | Sequence[str] = DEFAULT_KEYS,
    seed: int = 0,
    max_ops: int = 4,
    pause_after_failure: float = 0.0,
) -> dict[str, int]:
    """Run one client per session until ``txns`` transactions were run in all, or ``duration`` seconds passed.

    ``sessions`` are ``AsyncSession`` objects (``oribus.open_local`` or
    ``oribus.connect``), one per client; ``keys`` is a key count (keys
    ``la/k0``...) or the keys themselves. Returns how many transactions ended
    ok, fail and info. ``pause_after_failure``: seconds a client waits after a
    transaction that did not commit (under a nemesis, so a dead bus is not hammered).
    """
    if txns is None and duration is None:
        raise ValueError("give txns, duration or both")
    key_list = workload_keys(keys) if isinstance(keys, int) else list(keys)
    loop = asyncio.get_running_loop()
    deadline = None if duration is None else loop.time() + duration
    started = 0
    outcomes = {"ok": 0, "fail": 0, "info": 0}

    def more() -> bool:
        return (txns is None or started < txns) and (deadline is None or loop.time() < deadline)

    async def client(index: int, session: Any) -> None:
        nonlocal started
        rng = random.Random(f"{seed}/{index}")
        counter = 0

        def next_element() -> int:
            nonlocal counter
            counter += 1
            return (index + 1) * ELEMENT_STRIDE + counter

        while more():
            started += 1
            ops = plan_transaction(rng, key_list, next_element, max_ops)
            outcome = await _run_one(session, recorder, f"c{index}", ops)
            outcomes[outcome] += 1
            await asyncio.sleep(pause_after_failure if outcome != "ok" else 0)  # others interleave

    await asyncio.gather(*(client(i, s) for i, s in enumerate(sessions)))
    return outcomes


async def record_final(session: Any, recorder: Recorder, keys: int | Sequence[str] = DEFAULT_KEYS) -> None:
    """Read every workload key's value, version and kept history into the recorder's ``final`` event.

    Call it once the run is over and every fault healed. Reading history
    records no delivery; the values are read through ``get_many``.
    """
    key_list = workload_keys(keys) if isinstance(keys, int) else list(keys)
    items = await session.get_many(key_list)
    state = {k: [items[k].value, items[k].version] for k in key_list}
    history = {}
    for k in key_list:
        versions = await session.history(k)
        history[k] = [[v.version, v.commit_id, v.value] for v in sorted(versions, key=lambda v: v.version)]
    recorder.final(state, history)
