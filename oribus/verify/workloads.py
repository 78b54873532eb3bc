"""The clients of a verify run: list-append and agent-step, through the SDK or the HTTP API.

Every transaction reads its keys first, then commits its writes in transaction
scope (ORI checks exactly the reads made through the transaction), and is
recorded around the call (``oribus.checker.Recorder``, ``specs/history.md``):

- **list-append** (``la/k<i>.<generation>-<hash>`` under the run's prefix): a shape of the
  mix gives 1-4 reads and appends; an append puts the list it read with one unique
  element (client number x 1,000,000 + counter) added.
- **agent-step** (``step/k<i>.<generation>-<hash>``): read three distinct keys, write the first two
  (often on two shards: a two-phase commit), each with a value naming the step
  (``{"step": "<client>-<n>"}``, unique, so a read says which write it saw);
  committed only if all three are unchanged, as an agent acting on what it read.

A key moves on to its next generation after 64 planned writes (``KeyRing``).

Outcomes: ``ok``; ``fail`` when the transaction certainly did not commit
(Conflict, Aborted, SessionExpired, InvalidRequest, or it was never sent);
``info`` when the commit was sent and its outcome is unknown (Unavailable, a
timeout, a lost connection). The SDK is ``oribus.connect``; the HTTP client
speaks ``/v1/get`` and ``/v1/commit`` (``specs/http.md``) with the read's
``seqs`` as the commit's ``since``.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from oribus.checker.history import APPEND, READ, WRITE, Recorder
from oribus.checker.listappend import record_failure
from oribus.errors import OribusError, SessionExpired
from oribus.verify.plan import Mix, list_append_ops, step_keys

ELEMENT_STRIDE = 1_000_000
LIST_APPEND = "list-append"
AGENT_STEP = "agent-step"
WORKLOADS = (LIST_APPEND, AGENT_STEP)
_DEFINITE_HTTP = {400, 404, 409, 410, 413, 429}  # refused before anything was applied (specs/http.md)


class Refused(Exception):
    """An HTTP answer that says the transaction did not commit (``fail``), with its error code."""

    def __init__(self, code: str, status: int) -> None:
        super().__init__(code)
        self.code = code
        self.status = status


class Unknown(Exception):
    """An HTTP commit whose outcome is unknown (``info``): 5xx, a timeout, a lost connection."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


class Limiter:
    """At most ``rate`` transaction starts per second over every client (0: no limit)."""

    def __init__(self, rate: float) -> None:
        self.interval = 1.0 / rate if rate > 0 else 0.0
        self._next = 0.0

    async def wait(self) -> None:
        if not self.interval:
            return
        now = time.monotonic()
        slot = max(now, self._next)
        self._next = slot + self.interval
        if slot > now:
            await asyncio.sleep(slot - now)


@dataclass
class Progress:
    """What the clients did so far, for the progress line."""

    outcomes: Counter[str] = field(default_factory=Counter)

    def line(self) -> str:
        o = self.outcomes
        done = o["ok"] + o["fail"] + o["info"]
        return f"{done} transactions: {o['ok']} committed, {o['fail']} refused, {o['info']} unknown"


class Executor(Protocol):
    """One client's way to the deployment: reads, then one commit of writes."""

    session_ref: list[str]

    async def read(self, keys: list[str]) -> dict[str, tuple[Any, int]]: ...
    async def commit(self, writes: dict[str, Any]) -> dict[str, int]: ...
    @property
    def commit_id(self) -> str | None: ...
    @property
    def sent(self) -> bool: ...
    async def begin(self) -> None: ...
    async def after_refusal(self, code: str) -> None: ...


class SdkExecutor:
    """Transactions through ``oribus.connect``'s session (``session.transaction()``)."""

    def __init__(self, session: Any) -> None:
        self.session = session
        self.session_ref = list(session.session_ref)
        self.tx: Any = None

    async def begin(self) -> None:
        self.tx = self.session.transaction()

    async def read(self, keys: list[str]) -> dict[str, tuple[Any, int]]:
        items = await self.tx.get_many(keys)
        return {k: (items[k].value, items[k].version) for k in keys}

    async def commit(self, writes: dict[str, Any]) -> dict[str, int]:
        for k, v in writes.items():
            self.tx.put(k, v)
        return dict(await self.tx.commit())

    @property
    def commit_id(self) -> str | None:
        return str(self.tx.commit_id) if self.tx is not None else None

    @property
    def sent(self) -> bool:
        return bool(self.tx is not None and self.tx.sent)

    async def after_refusal(self, code: str) -> None:
        if code == SessionExpired.code:
            try:
                await self.session.reset_session()
            except OribusError:
                pass  # unreachable: the next transaction fails and tries again


class HttpExecutor:
    """Transactions through the HTTP API: ``POST /v1/get``, then ``POST /v1/commit`` with
    ``scope: transaction`` and the read's ``seqs`` as ``since``."""

    def __init__(self, http: Any, base_url: str, agent: str, session: str, ids: str, timeout: float) -> None:
        self.http = http  # an aiohttp.ClientSession
        self.base = base_url.rstrip("/")
        self.agent = agent
        self.session = session
        self.session_ref = [agent, session]
        self._ids = (f"{ids}-{n}" for n in itertools.count(1))
        self._commit_id: str | None = None
        self._sent = False
        self._since: dict[str, int] = {}
        self.timeout = timeout

    async def begin(self) -> None:
        self._commit_id = next(self._ids)
        self._sent = False
        self._since = {}

    async def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        import aiohttp

        try:
            async with self.http.post(self.base + path, json=body,
                                      timeout=aiohttp.ClientTimeout(total=self.timeout)) as r:
                try:
                    answer = await r.json(content_type=None)
                except ValueError:
                    answer = {}
                if r.status == 200:
                    return dict(answer)
                code = str(answer.get("error") or answer.get("code") or f"HTTP {r.status}")
                if r.status in _DEFINITE_HTTP:
                    raise Refused(code, r.status)
                raise Unknown(code)
        except (TimeoutError, aiohttp.ClientError) as e:
            raise Unknown(type(e).__name__) from e

    async def read(self, keys: list[str]) -> dict[str, tuple[Any, int]]:
        answer = await self._post("/v1/get", {"agent": self.agent, "session": self.session, "keys": keys})
        self._since = {str(k): int(v) for k, v in (answer.get("seqs") or {}).items()}
        return {i["key"]: (i["value"], int(i["version"])) for i in answer["items"]}

    async def commit(self, writes: dict[str, Any]) -> dict[str, int]:
        self._sent = True
        answer = await self._post("/v1/commit", {
            "agent": self.agent, "session": self.session, "commit_id": self._commit_id,
            "scope": "transaction", "since": self._since, "writes": writes,
        })
        return {str(k): int(v) for k, v in (answer.get("versions") or {}).items()}

    @property
    def commit_id(self) -> str | None:
        return self._commit_id

    @property
    def sent(self) -> bool:
        return self._sent

    async def after_refusal(self, code: str) -> None:
        if code == SessionExpired.code:
            try:
                await self._post("/v1/reset", {"agent": self.agent, "session": self.session})
            except (Refused, Unknown):
                pass


class KeyRing:
    """A workload's keys: ``n`` slots, each moving on to a fresh key (``k<slot>.<generation>``)
    once ``writes_per_key`` writes were planned on it. Lists stay short (every read records
    the whole list: without this a long run's history grows with the square of its length,
    and so does checking it — Elle rotates keys for the same reason), and every version of a
    key stays in its kept history (``DEFAULT_HISTORY_LIMIT``, 100 versions; the writes in
    flight when a key moves on add at most one per client), so the final read can check
    every acknowledged write for durability."""

    def __init__(self, prefix: str, n: int, writes_per_key: int = 64) -> None:
        self.prefix = prefix
        self.writes_per_key = writes_per_key
        self._generation = [0] * n
        self._appends = [0] * n
        self._slots: dict[str, int] = {}
        self._current = [self._name(i) for i in range(n)]
        self.used: list[str] = list(self._current)

    def _name(self, slot: int) -> str:
        # A hash in the name spreads the keys over the shards: names that differ only in a
        # counter have CRC-32Cs (the slot hash, specs/engine.md) that differ only in a few
        # bits, and fall on one or two shards: no cross-shard transactions to check.
        name = f"k{slot}.{self._generation[slot]}"
        key = f"{self.prefix}{name}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"
        self._slots[key] = slot
        return key

    def current(self) -> list[str]:
        return self._current

    def written(self, key: str) -> None:
        slot = self._slots[key]
        self._appends[slot] += 1
        if self._appends[slot] >= self.writes_per_key:
            self._appends[slot] = 0
            self._generation[slot] += 1
            self._current = list(self._current)  # a list handed out earlier stays as it was
            self._current[slot] = self._name(slot)
            self.used.append(self._current[slot])


@dataclass
class Planned:
    """One transaction to run: what it reads, and the writes it makes from what it read."""

    invoke: list[list[Any]]  # the recorded micro-ops
    reads: list[str]
    writes: Callable[[dict[str, tuple[Any, int]]], dict[str, Any]]


def plan_list_append(shape: tuple[tuple[str, int], ...], keys: list[str], next_element: Callable[[], int]
                     ) -> Planned:
    ops = list_append_ops(shape, keys, next_element)
    ops = [op for op in ops if op[0] == READ] + [op for op in ops if op[0] == APPEND]  # reads first

    def writes(seen: dict[str, tuple[Any, int]]) -> dict[str, Any]:
        lists: dict[str, list[Any]] = {}
        for _, key, element in (op for op in ops if op[0] == APPEND):
            if key not in lists:
                value = seen[key][0]
                lists[key] = list(value) if isinstance(value, list) else []
            lists[key].append(element)
        return lists

    return Planned(ops, [op[1] for op in ops if op[0] == READ], writes)


def plan_agent_step(step: tuple[int, int, int], keys: list[str], tag: str) -> Planned:
    picks = step_keys(step, keys)
    value = {"step": tag}
    ops: list[list[Any]] = [[READ, k, None] for k in picks] + [[WRITE, k, value] for k in picks[:2]]
    return Planned(ops, picks, lambda _seen: {k: value for k in picks[:2]})


async def run_one(ex: Executor, recorder: Recorder, process: str, planned: Planned) -> str:
    """Run and record one transaction; returns its outcome (ok, fail or info)."""
    await ex.begin()
    tid = recorder.invoke(process, ex.session_ref, planned.invoke)
    try:
        seen = await ex.read(planned.reads)
        versions = await ex.commit(planned.writes(seen))
    except OribusError as e:
        outcome = record_failure(recorder, tid, e, ex.sent, ex.commit_id)
        if outcome == "fail":
            await ex.after_refusal(e.code)
        return outcome
    except Refused as e:
        recorder.fail(tid, e.code, ex.commit_id)
        await ex.after_refusal(e.code)
        return "fail"
    except Unknown as e:
        if not ex.sent:
            recorder.fail(tid, e.code, None)
            return "fail"
        recorder.info(tid, e.code, ex.commit_id)
        return "info"
    except BaseException as e:  # cancelled at the end of the run, or a bug: outcome unknown
        recorder.info(tid, type(e).__name__, ex.commit_id if ex.sent else None)
        raise
    results = []
    for f, key, arg in planned.invoke:
        if f == READ:
            value, version = seen[key]
            results.append([f, key, value, version])
        else:
            results.append([f, key, arg, versions.get(key)])
    recorder.ok(tid, results, ex.commit_id)
    return "ok"


@dataclass
class Clients:
    """The run's clients: each walks its own seeded path through the mix until the deadline."""

    mix: Mix
    recorder: Recorder
    limiter: Limiter
    deadline: float  # time.monotonic() after which no transaction starts
    list_keys: KeyRing
    step_keys: KeyRing
    progress: Progress = field(default_factory=Progress)
    pause_after_failure: float = 0.05

    async def run_client(self, ex: Executor, process: str, workload: str, index: int) -> None:
        rng = self.mix.client_rng(process)
        counter = 0

        def next_element() -> int:
            nonlocal counter
            counter += 1
            return (index + 1) * ELEMENT_STRIDE + counter

        steps = 0
        while time.monotonic() < self.deadline:
            await self.limiter.wait()
            if time.monotonic() >= self.deadline:
                break
            if workload == LIST_APPEND:
                planned = plan_list_append(rng.choice(self.mix.shapes), self.list_keys.current(), next_element)
                ring = self.list_keys
            else:
                steps += 1
                planned = plan_agent_step(rng.choice(self.mix.steps), self.step_keys.current(), f"{process}-{steps}")
                ring = self.step_keys
            for op in planned.invoke:
                if op[0] != READ:
                    ring.written(op[1])
            outcome = await run_one(ex, self.recorder, process, planned)
            self.progress.outcomes[outcome] += 1
            self.progress.outcomes[f"{workload}:{outcome}"] += 1
            await asyncio.sleep(self.pause_after_failure if outcome != "ok" else 0)

