"""Durability and atomicity under SIGKILL at exact failpoints.

For every crash point (a failpoint at a durability boundary) and many hit
counts N spread over the run — early, middle and late, so the kill lands on
different shards and in different phases — a child process runs the seeded
workload (``workload.py``) with ``ORIBUS_FAILPOINTS=<point>=kill@N`` and
SIGKILLs itself on the Nth hit. Another child (``recovery_check.py``) then
reopens the data directory and holds it to the journal the workload wrote:
every acknowledged commit present, no commit half-applied, consecutive
per-key histories, deterministic recovery, and new commits working
afterwards.

The sweep runs once per module, two children at a time (the machine has
two cores); a run whose N was never reached finishes normally and is
checked too, but only runs that really died by SIGKILL count towards the
required number of crash points. To replay one run by hand, use the
command printed with its violations.

Checker self-tests at the end show each check can fail: they hand the
checker journals that claim what the data does not hold.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from recovery_check import check_expired_session, check_recovery  # noqa: E402

import oribus  # noqa: E402

# The sweep (about two minutes here) runs in the setup of the first test that
# needs it; pytest-timeout counts setup, so this module gets a wider limit.
pytestmark = pytest.mark.timeout(900)

WORKLOAD = HERE / "workload.py"
CHECKER = HERE / "recovery_check.py"

CRASH_POINTS = (
    "wal.before_append",
    "wal.after_append",
    "wal.before_fsync",
    "wal.after_fsync",
    "txn.after_prepare",
    "txn.after_decide",
    "txn.before_participant_commit",
    "snapshot.before_rename",
    "snapshot.after_rename",
)
RUNS_PER_POINT = 26  # armed runs per crash point (9 x 26 = 234)
MIN_REAL_CRASHES = 200  # runs that must really die by SIGKILL in one sweep
SHARD_COUNTS = (2, 3, 4)  # runs cycle through these engine sizes
CALIBRATION_SEED = 1
LATEST_HIT_FRACTION = 0.9  # the last armed hit, as a share of the calibrated hits
PARALLEL = 2  # children at a time
PROGRESS_LINES = 8  # progress lines the sweep prints while it runs
CHILD_TIMEOUT = 60.0  # seconds; a healthy child takes about one
# A few runs restart the workload after the first kill, armed again at the first
# hit of one of these points, so the second kill lands inside recovery (which
# resolves the transactions left in doubt) or right after it.
RECOVERY_KILLS = ("wal.before_append=kill@1", "txn.after_decide=kill@1", "wal.after_fsync=kill@2")
RECOVERY_KILL_RUNS = (7, 16)  # which of each point's runs do it
SECOND_SEED_OFFSET = 500_000  # the restarted workload's seed (so its commit ids are new)


class Children:
    """Starts child processes and makes sure none outlives the tests (killed by pid)."""

    def __init__(self) -> None:
        self._live: dict[int, subprocess.Popen] = {}
        self._lock = threading.Lock()

    def run(self, args: list[str], *, env: dict[str, str], timeout: float = CHILD_TIMEOUT
            ) -> tuple[int | None, str, str]:
        """Run a child to its end; returns (returncode or None on timeout, stdout, stderr)."""
        proc = subprocess.Popen(
            [sys.executable, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        with self._lock:
            self._live[proc.pid] = proc
        try:
            out, err = proc.communicate(timeout=timeout)
            return proc.returncode, out, err
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            return None, out, err
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            with self._lock:
                self._live.pop(proc.pid, None)

    def kill_all(self) -> None:
        with self._lock:
            live = list(self._live.values())
        for proc in live:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.fixture(scope="module")
def children() -> Iterator[Children]:
    procs = Children()
    yield procs
    procs.kill_all()


def child_env(failpoints: str | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("ORIBUS_FAILPOINTS", None)
    if failpoints:
        env["ORIBUS_FAILPOINTS"] = failpoints
    return env


@dataclass
class CrashRun:
    """One armed run of the workload and what the checker found after it."""

    point: str
    hit: int  # the armed hit count N
    seed: int
    shards: int
    directory: Path  # holds data/ and journal.jsonl
    then: str | None = None  # after the kill, restart the workload armed with this spec
    crashed: bool = False  # died by SIGKILL (at the armed point)
    second: str | None = None  # how the restarted workload ended: "killed" or "finished"
    finished: bool = False  # exited 0: the Nth hit never came
    error: str | None = None  # the workload or checker misbehaved (not a recovery verdict)
    violations: list[str] = field(default_factory=list)
    facts: dict = field(default_factory=dict)

    @property
    def data_dir(self) -> Path:
        return self.directory / "data"

    @property
    def journal(self) -> Path:
        return self.directory / "journal.jsonl"

    @property
    def armed(self) -> str:
        return f"{self.point}=kill@{self.hit}"

    def describe(self) -> str:
        text = (
            f"{self.armed} seed={self.seed} shards={self.shards} in {self.directory}\n"
            f"    replay: ORIBUS_FAILPOINTS={self.armed} {sys.executable} {WORKLOAD} "
            f"DIR/data DIR/journal.jsonl {self.seed} {self.shards}"
        )
        if self.then:
            text += (
                f"\n    then:   ORIBUS_FAILPOINTS={self.then} {sys.executable} {WORKLOAD} "
                f"DIR/data DIR/journal.jsonl {self.seed + SECOND_SEED_OFFSET} {self.shards}"
            )
        return text


def run_workload(run: CrashRun, children: Children, seed: int, armed: str) -> str:
    """One incarnation of the workload: "killed", "finished" or an error message."""
    rc, _, err = children.run(
        [str(WORKLOAD), str(run.data_dir), str(run.journal), str(seed), str(run.shards)],
        env=child_env(armed),
    )
    if rc == -signal.SIGKILL:
        return "killed"
    if rc == 0:
        return "finished"
    return f"workload ({armed}) exited with {rc if rc is not None else 'a timeout'}: {err[-2000:]}"


def execute(run: CrashRun, children: Children) -> CrashRun:
    """Run the armed workload (twice for recovery kills), then the checker on what is left."""
    run.directory.mkdir(parents=True)
    first = run_workload(run, children, run.seed, run.armed)
    run.crashed, run.finished = first == "killed", first == "finished"
    if not (run.crashed or run.finished):
        run.error = first
        return run
    if run.then and run.crashed:
        run.second = run_workload(run, children, run.seed + SECOND_SEED_OFFSET, run.then)
        if run.second not in ("killed", "finished"):
            run.error, run.second = run.second, None
            return run
    if not run.journal.exists():
        run.journal.touch()  # killed before its first event: the check still must pass
    rc, out, err = children.run(
        [str(CHECKER), str(run.data_dir), str(run.journal), str(run.shards)], env=child_env()
    )
    if rc != 0:
        run.error = f"checker exited with {rc if rc is not None else 'a timeout'}: {err[-3000:]}"
        return run
    report = json.loads(out)
    run.violations = report["violations"]
    run.facts = report["facts"]
    if (run.second or first) == "finished" and not run.facts["done"]:
        run.error = "the workload exited 0 without journaling the end of its run"
    return run


def calibrate(root: Path, children: Children, pool: ThreadPoolExecutor) -> dict[int, dict[str, int]]:
    """Failpoint hit counts of one unarmed run per engine size."""

    def one(shards: int) -> dict[str, int]:
        d = root / f"calibrate-{shards}"
        d.mkdir()
        hits = d / "hits.json"
        rc, _, err = children.run(
            [str(WORKLOAD), str(d / "data"), str(d / "journal.jsonl"), str(CALIBRATION_SEED),
             str(shards), "--hits-out", str(hits)],
            env=child_env(),
        )
        assert rc == 0, f"the unarmed workload failed ({rc}): {err[-3000:]}"
        return json.loads(hits.read_text())

    return dict(zip(SHARD_COUNTS, pool.map(one, SHARD_COUNTS), strict=True))


def plan(root: Path, hits: dict[int, dict[str, int]], points: tuple[str, ...] = CRASH_POINTS,
         runs_per_point: int = RUNS_PER_POINT, seed_base: int = 1000,
         recovery_kills: bool = True) -> list[CrashRun]:
    """``runs_per_point`` runs per crash point, N spread from the first hit to late in the run;
    with ``recovery_kills``, runs RECOVERY_KILL_RUNS of each point are killed again in recovery."""
    runs = []
    for p, point in enumerate(points):
        for j in range(runs_per_point):
            shards = SHARD_COUNTS[j % len(SHARD_COUNTS)]
            total = hits[shards].get(point, 0)
            assert total > 0, f"the workload never reaches {point} with {shards} shards: {hits[shards]}"
            last = max(1, int(total * LATEST_HIT_FRACTION))
            hit = 1 + round(j * (last - 1) / (runs_per_point - 1))
            seed = seed_base + p * runs_per_point + j
            then = None
            if recovery_kills and j in RECOVERY_KILL_RUNS:
                then = RECOVERY_KILLS[(p + RECOVERY_KILL_RUNS.index(j)) % len(RECOVERY_KILLS)]
            runs.append(CrashRun(point, hit, seed, shards, root / f"{point}-{hit}-s{seed}", then))
    # interleave the points so that the two children rarely run the same kind of crash
    return sorted(runs, key=lambda r: (r.seed % runs_per_point, r.point))


def execute_all(planned: list[CrashRun], children: Children, pool: ThreadPoolExecutor,
                progress: Callable[[int, int], None]) -> list[CrashRun]:
    """Run and check every planned run on ``pool``; ``progress(done, total)`` after each."""
    done = 0
    lock = threading.Lock()

    def one(run: CrashRun) -> CrashRun:
        nonlocal done
        execute(run, children)
        with lock:
            done += 1
            progress(done, len(planned))
        return run

    return list(pool.map(one, planned))


@dataclass
class Sweep:
    runs: list[CrashRun]
    seconds: float

    def of(self, point: str) -> list[CrashRun]:
        return [r for r in self.runs if r.point == point]

    @property
    def crashed(self) -> int:
        return sum(r.crashed for r in self.runs)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory, children: Children, crash_report: list[str],
          crash_progress: Callable[[str], None]) -> Sweep:
    root = tmp_path_factory.mktemp("crash-sweep")
    started = time.monotonic()
    crash_progress(f"crash sweep: calibrating the workload ({len(SHARD_COUNTS)} unarmed runs)")
    with ThreadPoolExecutor(PARALLEL) as pool:
        hits = calibrate(root, children, pool)
        planned = plan(root, hits)
        step = max(1, len(planned) // PROGRESS_LINES)

        def progress(done: int, total: int) -> None:
            if done % step == 0 or done == total:
                crash_progress(f"crash sweep: {done}/{total} armed runs checked, {time.monotonic() - started:.0f} s")

        runs = execute_all(planned, children, pool, progress)
    result = Sweep(runs, time.monotonic() - started)
    summary = {
        "armed": len(runs),
        "crashed": result.crashed,
        "finished": sum(r.finished for r in runs),
        "errors": sum(r.error is not None for r in runs),
        "with_violations": sum(bool(r.violations) for r in runs),
        "killed_again_after_restart": sum(r.second == "killed" for r in runs),
        "seconds": round(result.seconds, 1),
        "calibrated_hits": hits,
        "per_point": {p: sum(r.crashed for r in result.of(p)) for p in CRASH_POINTS},
    }
    (root / "summary.json").write_text(json.dumps(summary, indent=2))
    crash_report.append(
        f"crash sweep: {summary['crashed']} of {summary['armed']} armed crash points really died by "
        f"SIGKILL ({summary['finished']} finished first; {summary['killed_again_after_restart']} killed again "
        f"in or after recovery), {summary['with_violations']} with violations, "
        f"{summary['errors']} errors, {summary['seconds']} s; details in {root / 'summary.json'}"
    )
    crash_report.append("  crashes per point: " + ", ".join(f"{p} {n}" for p, n in summary["per_point"].items()))
    return result


def _explain(runs: list[CrashRun], limit: int = 8) -> str:
    lines = []
    for r in runs[:limit]:
        lines.append(r.describe())
        lines += [f"    {v}" for v in r.violations[:10]]
        if r.error:
            lines.append(f"    error: {r.error}")
    if len(runs) > limit:
        lines.append(f"... and {len(runs) - limit} more runs")
    return "\n".join(lines)


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_crash_point_recovers(sweep: Sweep, point: str) -> None:
    runs = sweep.of(point)
    errors = [r for r in runs if r.error]
    assert not errors, "runs that did not complete:\n" + _explain(errors)
    broken = [r for r in runs if r.violations]
    assert not broken, f"recovery after a kill at {point} broke its promises:\n" + _explain(broken)
    crashed = sum(r.crashed for r in runs)
    assert crashed >= len(runs) * 3 // 4, (
        f"only {crashed} of {len(runs)} runs armed at {point} really crashed: "
        + ", ".join(f"N={r.hit}:{'killed' if r.crashed else 'finished'}" for r in runs)
    )


def test_at_least_200_crash_points_really_crashed(sweep: Sweep, record_property) -> None:
    record_property("crash_points_really_crashed", sweep.crashed)
    print(f"{sweep.crashed} crash points really crashed in {sweep.seconds:.1f} s")
    assert sweep.crashed >= MIN_REAL_CRASHES, (
        f"only {sweep.crashed} runs died by SIGKILL at their armed point; at least {MIN_REAL_CRASHES} are required"
    )


def test_sweep_interrupts_commits_in_flight(sweep: Sweep) -> None:
    """The sweep is meaningful: kills leave commits in flight, and acknowledged ones are checked."""
    crashed = [r for r in sweep.runs if r.crashed and not r.error]
    in_flight = sum(r.facts["invoked"] > r.facts["acknowledged"] for r in crashed)
    assert in_flight >= len(crashed) // 2, "most kills should interrupt a commit in flight"
    assert sum(r.facts["acknowledged"] for r in crashed) > 20 * len(crashed), (
        "the checked runs acknowledged too few commits to prove durability"
    )
    restarted = [r for r in sweep.runs if r.then and r.crashed]
    assert sum(r.second == "killed" for r in restarted) >= len(restarted) // 2, (
        "most restarted workloads should be killed again in or right after recovery"
    )


# ---- a session from before the crash ------------------------------------------------


async def test_session_from_before_the_crash_cannot_commit(tmp_path: Path, children: Children) -> None:
    data, journal = tmp_path / "data", tmp_path / "journal.jsonl"
    rc, _, err = children.run(
        [str(WORKLOAD), str(data), str(journal), "77", "3"], env=child_env("txn.after_decide=kill@40")
    )
    assert rc == -signal.SIGKILL, f"the workload was expected to die at txn.after_decide: {rc} {err[-2000:]}"
    assert await check_expired_session(data, journal, 3) == []
    violations, _ = await check_recovery(data, journal, 3)
    assert violations == []


# ---- the checker itself ---------------------------------------------------------------
# Each of these hands the checker a journal that claims something the data does
# not hold, and expects the matching violation: the sweep's silence means something.


def _write_journal(path: Path, events: list[dict]) -> None:
    path.write_text("".join(json.dumps(e) + "\n" for e in events))


def _invoke(cid: str, keys: list[str], kind: str = "multi") -> dict:
    return {"ev": "invoke", "id": cid, "kind": kind, "keys": sorted(keys), "rollback": {}}


def _ok(cid: str, versions: dict[str, int]) -> dict:
    return {"ev": "ok", "id": cid, "versions": versions, "session": ["a", "b"], "tokens": {}}


async def _seed_data(data: Path, commits: dict[str, dict[str, object]], shards: int = 2) -> None:
    async with oribus.open_local(data, shards=shards, agent="seed") as bus:
        for cid, writes in commits.items():
            await bus.session(session_id=cid).commit(writes, commit_id=cid)


async def test_checker_flags_a_lost_acknowledged_commit(tmp_path: Path) -> None:
    data, journal = tmp_path / "data", tmp_path / "journal.jsonl"
    await _seed_data(data, {"c1": {"crash/k00": {"c": "c1"}}})
    _write_journal(journal, [
        _invoke("c1", ["crash/k00"], "put"), _ok("c1", {"crash/k00": 1}),
        _invoke("c2", ["crash/k01"], "put"), _ok("c2", {"crash/k01": 1}),  # acknowledged, never written
    ])
    violations, _ = await check_recovery(data, journal, 2)
    assert any(v.startswith("(a) acknowledged commit c2") for v in violations), violations


async def test_checker_flags_a_partial_commit(tmp_path: Path) -> None:
    data, journal = tmp_path / "data", tmp_path / "journal.jsonl"
    await _seed_data(data, {"c1": {"crash/k00": {"c": "c1"}}})
    _write_journal(journal, [_invoke("c1", ["crash/k00", "crash/k01"])])  # in flight at the kill
    violations, _ = await check_recovery(data, journal, 2)
    assert any(v.startswith("(b) partial commit c1") for v in violations), violations


async def test_checker_flags_a_refused_commit_that_landed(tmp_path: Path) -> None:
    data, journal = tmp_path / "data", tmp_path / "journal.jsonl"
    await _seed_data(data, {"c1": {"crash/k00": {"c": "c1"}}})
    _write_journal(journal, [
        _invoke("c1", ["crash/k00"], "put"),
        {"ev": "fail", "id": "c1", "code": "Conflict", "definite": True},
    ])
    violations, _ = await check_recovery(data, journal, 2)
    assert any("was refused (Conflict) but is present" in v for v in violations), violations


async def test_checker_flags_phantom_writes_and_wrong_values(tmp_path: Path) -> None:
    data, journal = tmp_path / "data", tmp_path / "journal.jsonl"
    await _seed_data(data, {"c1": {"crash/k00": {"c": "someone-else"}}, "c2": {"crash/k01": 1}})
    _write_journal(journal, [_invoke("c1", ["crash/k00"], "put"), _ok("c1", {"crash/k00": 1})])
    violations, _ = await check_recovery(data, journal, 2)
    assert any("does not embed the commit id" in v for v in violations), violations
    assert any("commit id 'c2', which was never invoked" in v for v in violations), violations
