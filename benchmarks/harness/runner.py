"""One run: a backend, a point, a fresh store, a measured window, the audit.

Phases (shown on the progress bar): ``reset`` (empty store), ``populate``
(bounded by ``populate_timeout``: past it the point is recorded as skipped),
``touch`` (every session made live), ``warmup``, ``measure``, ``drain``
(workers finish the step they are in), ``audit``.

Clients are asyncio tasks in this process (uvloop when installed), one per
worker, each with its own ``Random`` seeded from ``seed`` and its index.
Latency is the time from a step's first read to the acknowledgement of its
commit, retries included (the agent's view); only steps that committed in
the window count. ``retries_per_commit`` is conflicts / commits in the window.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from agent_step import percentile
from peers.base import Backend, Client

from harness.audit import AuditReport, History, audit
from harness.cpu import CpuMeter
from harness.workloads import KeyPicker, Point, key_name

CDF_POINTS = 100  # latency quantiles kept per run for the CDF plot
TOUCH_IN_FLIGHT = 64
DRAIN_TIMEOUT = 60.0  # seconds the workers get to finish their step after the window


@dataclass
class RunOptions:
    duration: float = 10.0  # measured seconds
    warmup: float = 2.0  # seconds run before measuring
    max_retries: int = 20  # attempts after the first before a step is given up
    populate_timeout: float = 300.0  # seconds; past it the point is skipped
    seed: int = 1


@dataclass
class RunResult:
    backend: str
    point_id: str
    point: dict
    status: str  # ok | skipped | failed | unavailable
    reason: str = ""
    duration: float = 0.0  # seconds actually measured
    committed: int = 0  # steps committed in the window (read-only: reads completed)
    conflicts: int = 0  # refused attempts in the window
    gave_up: int = 0  # steps abandoned after max_retries in the window
    errors: int = 0  # attempts with an unknown outcome (whole run)
    first_error: str = ""
    committed_per_s: float = 0.0
    conflicts_per_s: float = 0.0
    retries_per_commit: float = 0.0
    p50_ms: float = 0.0
    p95_ms: float = 0.0
    p99_ms: float = 0.0
    mean_ms: float = 0.0
    latency_cdf_ms: list[float] = field(default_factory=list)  # CDF_POINTS+1 quantiles, 0..100 %
    populate_seconds: float = 0.0
    load_average: float = 0.0  # 1-minute load average at the end of the window
    client_cpu: float = 0.0  # CPU seconds per second of this process during the window
    server_cpu: float = 0.0  # CPU seconds per second of the server processes during the window
    other_cpu: float = 0.0  # CPU seconds per second used by everything else on the machine
    cpu_ms_per_op: float = 0.0  # client + server CPU milliseconds per committed step (or read)
    faults_per_op: float = 0.0  # client + server minor page faults per committed step (or read)
    audit: dict = field(default_factory=dict)

    @property
    def audit_ok(self) -> bool:
        return bool(self.audit.get("ok"))

    def as_dict(self) -> dict:
        return asdict(self)


class Window:
    """What the workers share: the phase and the counts of the measured window."""

    def __init__(self) -> None:
        self.measuring = False
        self.stopping = False
        self.committed = 0
        self.conflicts = 0
        self.gave_up = 0
        self.errors = 0
        self.first_error = ""
        self.latencies: list[float] = []
        self.attempts_total = 0  # whole run, for the live rate

    def error(self, e: BaseException) -> None:
        self.errors += 1
        if not self.first_error:
            self.first_error = f"{type(e).__name__}: {e}"[:500]


def sessions_of(worker: int, clients: int, sessions: int) -> list[int]:
    """The agents a worker takes steps for: its share of ``sessions`` (shared when fewer)."""
    if sessions <= clients:
        return [worker % sessions]
    return list(range(worker, sessions, clients))


async def worker(index: int, client: Client, point: Point, picker: KeyPicker, w: Window,
                 history: History, opts: RunOptions) -> None:
    rng = random.Random(opts.seed * 1_000_003 + index)
    agents = sessions_of(index, point.clients, point.sessions)
    perf = time.perf_counter
    turn = 0
    read_only = point.workload == "read-only"
    while not w.stopping:
        # An in-process backend can answer without ever suspending (an embedded read is
        # served from memory): give the other workers and the window's timer their turn.
        await asyncio.sleep(0)
        session = agents[turn % len(agents)]
        turn += 1
        keys = picker.pick(rng)
        started = perf()
        if read_only:
            try:
                got = await client.read(keys, session)
            except Exception as e:  # noqa: BLE001 - counted and reported; the run goes on
                w.error(e)
                continue
            history.read_only(got)
            w.attempts_total += 1
            if w.measuring:
                w.committed += 1
                w.latencies.append(perf() - started)
            continue
        writes = keys[:point.writes]
        for attempt in range(opts.max_retries + 1):
            w.attempts_total += 1
            try:
                out = await client.step(keys, writes, session)
            except Exception as e:  # noqa: BLE001 - outcome unknown: the audit allows for it
                history.outcome_unknown(writes)
                w.error(e)
                break
            if out.committed:
                acked = perf()
                history.committed(out, acked)
                if w.measuring:
                    w.committed += 1
                    w.latencies.append(acked - started)
                break
            if w.measuring:
                w.conflicts += 1
            if w.stopping:
                break
            if attempt == opts.max_retries and w.measuring:
                w.gave_up += 1


async def run_point(backend: Backend, point: Point, opts: RunOptions,
                    phase: Callable[[str, float], None] = lambda name, rate: None) -> RunResult:
    """Run ``point`` on a started ``backend``; ``phase(name, live_rate)`` reports progress."""
    point = point.canonical()
    result = RunResult(backend.name, point.id, point.as_dict(), status="ok")
    keys = [key_name(i) for i in range(point.keys)]
    phase("reset", 0.0)
    await backend.reset()
    phase("populate", 0.0)
    t0 = time.perf_counter()
    try:
        await asyncio.wait_for(backend.populate(keys, point.value_size), opts.populate_timeout)
    except TimeoutError:
        result.status = "skipped"
        result.reason = (f"populating {point.keys} keys took over {opts.populate_timeout:g}s "
                         "(--populate-timeout)")
        return result
    result.populate_seconds = time.perf_counter() - t0

    clients = [await backend.client() for _ in range(point.clients)]
    w = Window()
    history = History(keys)
    tasks: list[asyncio.Task] = []
    try:
        phase("touch", 0.0)
        sem = asyncio.Semaphore(TOUCH_IN_FLIGHT)

        async def touch(s: int) -> None:
            async with sem:
                await clients[s % len(clients)].touch(s, keys[s % len(keys)])

        await asyncio.gather(*(touch(s) for s in range(point.sessions)))

        picker = KeyPicker(keys, point.reads, point.hot)
        tasks = [asyncio.create_task(worker(i, c, point, picker, w, history, opts))
                 for i, c in enumerate(clients)]
        await _watch(tasks, opts.warmup, "warmup", w, phase)
        cpu = CpuMeter(backend.server_sessions())
        cpu.start()
        w.measuring = True
        started = time.perf_counter()
        await _watch(tasks, opts.duration, "measure", w, phase)
        w.measuring = False
        result.duration = time.perf_counter() - started
        cpu.stop()
        result.client_cpu = cpu.client / result.duration
        result.server_cpu = cpu.server / result.duration
        result.other_cpu = cpu.other / result.duration
        result.cpu_ms_per_op = (cpu.client + cpu.server) * 1e3 / w.committed if w.committed else 0.0
        result.faults_per_op = (cpu.client_faults + cpu.server_faults) / w.committed if w.committed else 0.0
        result.load_average = os.getloadavg()[0]
        w.stopping = True
        phase("drain", 0.0)
        done, pending = await asyncio.wait(tasks, timeout=DRAIN_TIMEOUT)
        for t in done:
            if t.exception() is not None:
                raise t.exception()
        if pending:
            result.status = "failed"
            result.reason = f"{len(pending)} workers did not finish their step within {DRAIN_TIMEOUT:g}s"
    finally:
        # However the run ends (an error, a cancellation): no worker may outlive it. A client
        # library can swallow a cancellation; the stopping flag ends its loop all the same.
        w.stopping = True
        leftover = [t for t in tasks if not t.done()]
        for t in leftover:
            t.cancel()
        if leftover:
            await asyncio.wait(leftover, timeout=10)
        for c in clients:
            try:
                await c.close()
            except Exception:  # noqa: BLE001, S110 - closing is best effort
                pass
    if result.status != "ok":
        return result

    phase("audit", 0.0)
    final = await backend.read_counters(keys)
    report: AuditReport = audit(history, final)
    result.audit = report.as_dict()
    result.committed = w.committed
    result.conflicts = w.conflicts
    result.gave_up = w.gave_up
    result.errors = w.errors
    result.first_error = w.first_error
    d = result.duration or 1.0
    result.committed_per_s = w.committed / d
    result.conflicts_per_s = w.conflicts / d
    result.retries_per_commit = w.conflicts / w.committed if w.committed else 0.0
    lat = sorted(w.latencies)
    result.p50_ms = percentile(lat, 50) * 1e3
    result.p95_ms = percentile(lat, 95) * 1e3
    result.p99_ms = percentile(lat, 99) * 1e3
    result.mean_ms = sum(lat) / len(lat) * 1e3 if lat else 0.0
    if lat:
        result.latency_cdf_ms = [lat[min(len(lat) - 1, int(q / CDF_POINTS * len(lat)))] * 1e3
                                 for q in range(CDF_POINTS + 1)]
    return result


async def _watch(tasks: list[asyncio.Task], seconds: float, name: str, w: Window,
                 phase: Callable[[str, float], None]) -> None:
    """Sleep ``seconds``, reporting the live attempt rate; stop early if every worker died."""
    end = time.perf_counter() + seconds
    last_n, last_t = w.attempts_total, time.perf_counter()
    while (left := end - time.perf_counter()) > 0:
        await asyncio.sleep(min(0.5, left))
        now = time.perf_counter()
        phase(name, (w.attempts_total - last_n) / max(now - last_t, 1e-9))
        last_n, last_t = w.attempts_total, now
        if all(t.done() for t in tasks):
            for t in tasks:
                if t.exception() is not None:
                    raise t.exception()
            return
