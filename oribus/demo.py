"""``oribus demo``: one fleet of agents, run with ORI validation and without it.

A fleet of simulated agents (no LLM: a few milliseconds of random "think
time" between reading and committing) works on the documents of a few
projects, spread over the shards of an embedded engine::

    owner          reads requirements                      writes requirements
    planner        reads requirements                      writes plan
    schema-writer  reads plan                              writes schema
    api-writer     reads plan                              writes api
    deployer       reads schema + api (two shards)         writes deploy
    reviewer       reads plan + schema + api + deploy      writes verdict

Every agent also reads the document it rewrites. Each step is a transaction
run with ``session.run`` (a refused commit is retried from a fresh read, as
an agent would redo its work). The fleet runs twice on fresh data: with ORI
validation, then with ``unsafe_disable_validation`` (a demo/testing switch
that accepts stale commits).

The corruption checker trusts neither the engine's validation nor its
counters. Every value names the version of each input it was derived from
(``derived_from``), and the agents keep their own ledger, outside the
engine, of a logical clock tick taken just before each commit is sent and
just after it is acknowledged. After the run the checker walks every key's
history and calls a committed version C *corrupt* when an input it was
derived from had already changed when C was committed:

* C wrote key K derived from K at version v, yet C is not version v+1 of K:
  another commit of K landed between C's read and C's write;
* C was derived from input I at version v, and the commit that made version
  v+1 of I was acknowledged before C was even sent.

Both prove a commit point that replaced the input before C's commit point,
so a correct ORI engine must have refused C: the count is 0 with
validation. It is a lower bound (overlapping commits are not counted),
which is still far above 0 without it.

A last section reopens the validated run's data: every acknowledged commit
is there, and a session that read before the restart fails closed.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import random
import shutil
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import oribus
from oribus.meta.slots import StaticSlotMap

# Every version of every key must stay in history for the checker to see it.
HISTORY_LIMIT = 1_000_000

# Refusals that mean "something this commit read or expected had changed".
STALE_REASONS = frozenset({"stale_read", "expected_version", "blind_write"})

PROJECT_NAMES = ("billing", "search", "checkout", "inventory", "accounts", "shipping", "reports")


@dataclass(frozen=True)
class Role:
    name: str
    reads: tuple[str, ...]  # documents of the project it reads, besides the one it rewrites
    writes: str  # the document it rewrites
    agents: int  # how many agents play it


ROLES = (
    Role("owner", (), "requirements", 1),
    Role("planner", ("requirements",), "plan", 2),
    Role("schema-writer", ("plan",), "schema", 2),
    Role("api-writer", ("plan",), "api", 2),
    Role("deployer", ("schema", "api"), "deploy", 2),
    Role("reviewer", ("plan", "schema", "api", "deploy"), "verdict", 1),
)
DOCUMENTS = ("requirements", "plan", "schema", "api", "deploy", "verdict")


def doc_key(project: str, doc: str) -> str:
    return f"fleet/{project}/{doc}"


def choose_projects(count: int, slot_map: StaticSlotMap) -> list[str]:
    """Project names whose deployer reads (schema, api) live on two shards, when there are two."""
    if slot_map.shard_count < 2:
        return [f"app-{i}" for i in range(1, count + 1)]
    names = itertools.chain(PROJECT_NAMES, (f"app-{i}" for i in itertools.count(1)))
    chosen: list[str] = []
    for name in names:
        if slot_map.shard_for(doc_key(name, "schema")) != slot_map.shard_for(doc_key(name, "api")):
            chosen.append(name)
            if len(chosen) == count:
                return chosen
    raise AssertionError("unreachable")


# ---- what the agents record, outside the engine ----------------------------------


class Ledger:
    """The agents' own record of their commits, on a logical clock (one event loop: a total order)."""

    def __init__(self) -> None:
        self._clock = itertools.count(1)
        self.sent: dict[str, int] = {}  # commit id -> tick taken after the last read, before sending
        self.acked: dict[str, int] = {}  # commit id -> tick taken after the acknowledgement
        self.versions: dict[str, dict[str, int]] = {}  # commit id -> key -> version acknowledged

    def before_send(self, commit_id: str) -> None:
        self.sent[commit_id] = next(self._clock)

    def acknowledged(self, commit_id: str, versions: dict[str, int]) -> None:
        self.acked[commit_id] = next(self._clock)
        self.versions[commit_id] = dict(versions)


@dataclass
class Tally:
    """Live counters of one run."""

    commits: int = 0
    conflicts: int = 0  # refusals naming a changed read (what ORI catches)
    lock_conflicts: int = 0  # refusals only because another transaction held a lock
    retries: int = 0  # transactions re-run after a refusal
    gave_up: int = 0  # steps abandoned after the retry budget ran out

    def refused(self, error: BaseException) -> None:
        if isinstance(error, oribus.Conflict) and any(s.reason in STALE_REASONS for s in error.stale):
            self.conflicts += 1
        else:
            self.lock_conflicts += 1


@dataclass(frozen=True)
class CountingRetryPolicy(oribus.RetryPolicy):
    """The default retry policy, also counting each refusal it is asked about."""

    tally: Tally = field(default_factory=Tally)

    def retry_transaction(self, error: BaseException) -> bool:
        self.tally.refused(error)
        retry = super().retry_transaction(error)
        self.tally.retries += retry
        return retry


# ---- the agents ---------------------------------------------------------------------


class Agent:
    """One simulated agent: pick a project, read, think, rewrite its document, repeat."""

    def __init__(
        self,
        session: oribus.AsyncSession,
        role: Role,
        projects: list[str],
        ledger: Ledger,
        tally: Tally,
        rng: random.Random,
        think: tuple[float, float],
    ) -> None:
        self.session = session
        self.role = role
        self.projects = projects
        self.ledger = ledger
        self.tally = tally
        self.rng = rng
        self.think = think
        self.policy = CountingRetryPolicy(tally=tally)

    async def _step(self, tx: oribus.Transaction, project: str) -> oribus.Transaction:
        out = doc_key(project, self.role.writes)
        reads = [doc_key(project, d) for d in self.role.reads] + [out]
        items = await tx.get_many(reads)
        await asyncio.sleep(self.rng.uniform(*self.think))
        mine = items[out].value or {}
        tx.put(out, {
            "by": self.session.agent,
            "rev": mine.get("rev", 0) + 1,
            "derived_from": {k: item.version for k, item in items.items()},
        })
        self.ledger.before_send(tx.commit_id)
        return tx

    async def work(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            project = self.rng.choice(self.projects)
            try:
                tx = await self.session.run(functools.partial(self._step, project=project), policy=self.policy)
            except oribus.OribusError as e:
                if not e.retryable:
                    raise
                self.tally.refused(e)
                self.tally.gave_up += 1
                continue
            assert tx.versions is not None
            self.ledger.acknowledged(tx.commit_id, tx.versions)
            self.tally.commits += 1
            await asyncio.sleep(self.rng.uniform(0, self.think[1]))


# ---- the independent checker -------------------------------------------------------


@dataclass(frozen=True)
class Corruption:
    key: str
    version: int
    agent: str
    input_key: str
    input_version: int  # the version it was derived from
    newer_version: int  # a version of the input that was already committed

    def describe(self) -> str:
        if self.input_key == self.key:
            when = "was committed between its read and its write"
        else:
            when = "had been acknowledged before it was even sent"
        return (f"{self.key} v{self.version} by {self.agent} was derived from {self.input_key} "
                f"v{self.input_version}, but v{self.newer_version} {when}")


@dataclass
class Audit:
    checked: int = 0  # committed versions checked
    unchecked: int = 0  # versions whose inputs' later versions fell out of history
    corruptions: list[Corruption] = field(default_factory=list)


async def load_histories(session: oribus.AsyncSession, keys: Iterable[str]) -> dict[str, dict[int, oribus.Version]]:
    """key -> version -> history entry (reading history is not a delivery)."""
    return {k: {v.version: v for v in await session.history(k)} for k in keys}


def audit(histories: dict[str, dict[int, oribus.Version]], ledger: Ledger) -> Audit:
    """Find committed versions derived from an input that had already changed (module docstring)."""
    result = Audit()
    for key, versions in histories.items():
        for entry in versions.values():
            sent = ledger.sent.get(entry.commit_id)
            if sent is None or not isinstance(entry.value, dict):
                continue  # not written by this run's fleet
            result.checked += 1
            for input_key, read in entry.value["derived_from"].items():
                if input_key == key:
                    newer = read + 1 if entry.version != read + 1 else None
                else:
                    following = histories[input_key].get(read + 1)
                    if following is None:
                        if read + 1 < min(histories[input_key], default=0):
                            result.unchecked += 1
                        continue
                    acked = ledger.acked.get(following.commit_id)
                    newer = read + 1 if acked is not None and acked < sent else None
                if newer is not None:
                    result.corruptions.append(
                        Corruption(key, entry.version, entry.agent, input_key, read, newer)
                    )
                    break
    return result


def missing_acknowledged(histories: dict[str, dict[int, oribus.Version]], ledger: Ledger) -> list[str]:
    """Acknowledged commits whose version is not in history under their own commit id."""
    missing = []
    for commit_id, versions in ledger.versions.items():
        for key, version in versions.items():
            entry = histories.get(key, {}).get(version)
            if entry is None or entry.commit_id != commit_id:
                missing.append(f"{key} v{version} ({commit_id})")
    return missing


# ---- one run of the fleet ---------------------------------------------------------


@dataclass
class FleetRun:
    mode: str
    tally: Tally
    elapsed: float
    audit: Audit
    keys: list[str]
    ledger: Ledger
    probe: tuple[oribus.SessionRef, dict[int, Any]]  # a session that read just before the engine closed

    @property
    def commits_per_second(self) -> float:
        return self.tally.commits / self.elapsed if self.elapsed else 0.0


def _progress_line(label: str, tally: Tally, elapsed: float) -> str:
    return (f"  {label:<24} {elapsed:5.1f}s  commits {tally.commits:6d}  "
            f"conflicts {tally.conflicts:5d}  retries {tally.retries:5d}")


async def _show_progress(label: str, tally: Tally, t0: float) -> None:
    while True:
        sys.stdout.write("\r" + _progress_line(label, tally, time.perf_counter() - t0))
        sys.stdout.flush()
        await asyncio.sleep(0.1)


async def run_fleet(
    data_dir: Path,
    *,
    unsafe: bool,
    shards: int = 2,
    seconds: float = 6.0,
    projects: int = 2,
    think: tuple[float, float] = (0.002, 0.008),
    seed: int = 1,
    live: bool = False,
) -> FleetRun:
    """Run the fleet for ``seconds`` on an engine in ``data_dir``, then audit every key's history."""
    label = "unsafe: validation off" if unsafe else "ORI validation"
    slot_map = StaticSlotMap(shards)
    names = choose_projects(projects, slot_map)
    keys = [doc_key(p, d) for p in names for d in DOCUMENTS]
    ledger = Ledger()
    tally = Tally()
    async with oribus.open_local(
        data_dir, shards=shards, agent="auditor", history_limit=HISTORY_LIMIT,
        unsafe_disable_validation=unsafe,
    ) as bus:
        rng = random.Random(seed)
        agents = [
            Agent(bus.session(agent=f"{role.name}-{n}"), role, names, ledger, tally,
                  random.Random(rng.random()), think)
            for role in ROLES
            for n in range(1, role.agents + 1)
        ]
        stop = asyncio.Event()
        t0 = time.perf_counter()
        progress = asyncio.create_task(_show_progress(label, tally, t0)) if live else None
        work = [asyncio.create_task(a.work(stop)) for a in agents]
        try:
            await asyncio.sleep(seconds)
        finally:
            stop.set()
            await asyncio.gather(*work)  # each agent finishes its step: nothing is cut mid-commit
            elapsed = time.perf_counter() - t0
            if progress is not None:
                progress.cancel()
        line = _progress_line(label, tally, elapsed)
        print(("\r" if live else "") + line, flush=True)
        result = audit(await load_histories(bus, keys), ledger)
        probe = bus.session(agent="probe")
        await probe.get(keys[0])
        probe_state = (probe.session_ref, dict(probe._tokens))  # what a client would keep across a restart
    return FleetRun(label, tally, elapsed, result, keys, ledger, probe_state)


# ---- the whole demo -----------------------------------------------------------------


@dataclass
class DemoReport:
    ori: FleetRun
    unsafe: FleetRun
    problems: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 0 if not self.problems else 1


def _say(title: str) -> None:
    print(f"\n== {title}")


def _print_layout(names: list[str], slot_map: StaticSlotMap) -> None:
    for p in names:
        where = "  ".join(f"{d}@{slot_map.shard_for(doc_key(p, d))}" for d in DOCUMENTS)
        print(f"  {p:<10} {where}")


def _print_table(runs: list[FleetRun]) -> None:
    head = ("mode", "commits", "conflicts caught", "retries", "corruptions", "commits/s")
    rows = [
        (r.mode, str(r.tally.commits), str(r.tally.conflicts), str(r.tally.retries),
         str(len(r.audit.corruptions)), f"{r.commits_per_second:.0f}")
        for r in runs
    ]
    widths = [max(len(x) for x in col) for col in zip(head, *rows, strict=True)]
    for row in (head, *rows):
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
        print("  " + "  ".join(cells))


async def _restart(data_dir: Path, shards: int, run: FleetRun) -> list[str]:
    """Reopen a run's data: acknowledged commits survive, a pre-restart session fails closed."""
    problems = []
    async with oribus.open_local(data_dir, shards=shards, agent="auditor", history_limit=HISTORY_LIMIT) as bus:
        histories = await load_histories(bus, run.keys)
        missing = missing_acknowledged(histories, run.ledger)
        if missing:
            problems.append(f"{len(missing)} acknowledged commits lost in the restart, e.g. {missing[0]}")
        print(f"  after reopening: {len(run.ledger.versions) - len(missing)} of {len(run.ledger.versions)} "
              "acknowledged commits present in history")
        again = audit(histories, run.ledger)
        print(f"  history re-audited after the restart: {again.checked} versions, "
              f"{len(again.corruptions)} corruptions")
        ref, tokens = run.probe
        old = bus.session(agent=ref.agent, session_id=ref.session_id)
        old._tokens.update(tokens)
        try:
            await old.commit({run.keys[0]: {"by": "probe", "note": "based on a read from before the restart"}})
            problems.append("a session whose reads were lost in the restart committed (not fail closed)")
        except oribus.SessionExpired as e:
            print(f"  pre-restart session refused: SessionExpired ({e.message[:60]}...)")
    return problems


async def demo(
    data_dir: Path,
    *,
    shards: int = 2,
    fresh: bool = True,
    seconds: float = 6.0,
    projects: int = 2,
    live: bool | None = None,
) -> DemoReport:
    """Run the fleet with and without validation, audit both, restart the first; report."""
    data_dir = Path(data_dir)
    if live is None:
        live = sys.stdout.isatty()
    if fresh and data_dir.exists():
        shutil.rmtree(data_dir)
    slot_map = StaticSlotMap(shards)
    names = choose_projects(projects, slot_map)
    agents = sum(r.agents for r in ROLES)
    print(f"oribus demo: embedded engine, {shards} shards, fsync on, data in {data_dir}")
    print(f"{agents} agents on {len(names)} projects; document@shard:")
    _print_layout(names, slot_map)
    if shards > 1:
        print("  the deployer reads schema and api on two shards; the reviewer reads four documents")

    _say(f"1. the fleet for {seconds:g}s with ORI validation, then {seconds:g}s without")
    ori = await run_fleet(data_dir / "ori", unsafe=False, shards=shards, seconds=seconds,
                          projects=projects, live=live)
    unsafe = await run_fleet(data_dir / "unsafe", unsafe=True, shards=shards, seconds=seconds,
                             projects=projects, live=live)
    report = DemoReport(ori, unsafe)

    _say("2. summary (corruptions counted by a checker that reads only histories and the agents' ledger)")
    _print_table([ori, unsafe])
    print("  conflicts caught: commits refused because something they read had changed;")
    print("  retries: transactions re-run after any refusal (lock conflicts included)")
    for run in (ori, unsafe):
        if run.tally.gave_up:
            print(f"  {run.mode}: {run.tally.gave_up} step(s) gave up after the retry budget")
        if run.audit.unchecked:
            print(f"  {run.mode}: {run.audit.unchecked} inputs could not be checked (out of history)")
    if unsafe.audit.corruptions:
        # prefer an example whose stale input lives on another shard than the key written
        c = min(unsafe.audit.corruptions,
                key=lambda c: slot_map.shard_for(c.key) == slot_map.shard_for(c.input_key))
        print(f"  e.g. without validation: {c.describe()}")

    if ori.audit.corruptions:
        report.problems.append(
            f"the ORI run has {len(ori.audit.corruptions)} corruptions, e.g. {ori.audit.corruptions[0].describe()}"
        )
    if not unsafe.audit.corruptions:
        report.problems.append("the unsafe run showed no corruption: the workload was not contended enough")
    if not ori.tally.commits or not unsafe.tally.commits:
        report.problems.append("a run committed nothing")

    _say("3. restart the validated run's engine")
    report.problems += await _restart(data_dir / "ori", shards, ori)

    if report.problems:
        print("\ndemo FAILED:")
        for p in report.problems:
            print(f"  - {p}")
    else:
        print(f"\ndemo finished: 0 corruptions with ORI, {len(unsafe.audit.corruptions)} without")
    return report


async def run_demo(data_dir: Path, *, shards: int = 2, fresh: bool = True, seconds: float = 6.0) -> int:
    """``oribus demo``: returns the process exit code (0 when every check passed)."""
    report = await demo(data_dir, shards=shards, fresh=fresh, seconds=seconds)
    return report.exit_code
