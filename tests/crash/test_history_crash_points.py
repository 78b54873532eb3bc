"""The crash sweep of test_crash_points.py with history on disk (``history_store="lmdb"``).

Same workload, same checker (every acknowledged commit present, none half
applied, consecutive per-key histories read back through ``history``, new
commits working), with the shards' older versions in LMDB, killed at the three
history failpoints — ``history.before_flush`` (the WAL record is durable, the
engine lacks the versions it replaced), ``history.before_commit`` (the
committer thread holds batches it has not yet written) and
``history.after_sync`` (the engine is fsynced, the snapshot not yet written) — and at the WAL and snapshot points
where the engine and the WAL part ways. Fewer runs per point than the main
sweep: it is the same machinery, and these runs check the engine's half.

The age rule's compaction (specs/engine.md "Retention") is swept too, with a
max age short enough (``COMPACTION_MAX_AGE``) for the workload's versions to
age during its run: killed at ``history.compact`` (a step dropped versions
from what reads see, the engine not yet told) with both stores, and at
``history.compact_commit`` (inside the LMDB committer's transaction of those
deletes). Recovery must give each key one consecutive run of versions ending at
its current one, every acknowledged version at or above the oldest kept, and
the rest of the checker's promises (``recovery_check.py`` says what the age
rule may have dropped).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from test_crash_points import (  # noqa: E402
    PARALLEL,
    Children,
    Sweep,
    _explain,
    calibrate,
    execute_all,
    plan,
)
from workload import HISTORY_MAX_AGE_ENV, HISTORY_STORE_ENV  # noqa: E402

pytestmark = pytest.mark.timeout(900)

POINTS = (
    "history.before_flush",
    "history.before_commit",
    "history.after_sync",
    "wal.after_fsync",
    "txn.after_decide",
    "snapshot.before_rename",
    "snapshot.after_rename",
)
RUNS_PER_POINT = 7  # 7 x 7 = 49 armed runs (fewer than the 54 before the committer point joined)
MIN_REAL_CRASHES = 40
# The age rule's compaction, per history store: the points it passes (killed mid-compaction).
COMPACTION_POINTS = {
    "memory": ("history.compact",),
    "lmdb": ("history.compact", "history.compact_commit"),
}
COMPACTION_RUNS_PER_POINT = 6  # 3 x 6 = 18 armed runs
# Seconds: the workload's whole run takes a few tenths of a second, and its versions must age in it.
COMPACTION_MAX_AGE = "0.03"


@pytest.fixture(scope="module")
def children() -> Iterator[Children]:
    procs = Children()
    yield procs
    procs.kill_all()


def run_sweep(root: Path, children: Children, crash_progress: Callable[[str], None], label: str,
              points: tuple[str, ...], runs_per_point: int, seed_base: int) -> Sweep:
    """Calibrate, then kill the workload ``runs_per_point`` times at each of ``points`` (hits spread
    over the run) and check each recovery. The environment (history store, max age) is the caller's."""
    started = time.monotonic()
    crash_progress(f"{label}: calibrating")

    with ThreadPoolExecutor(PARALLEL) as pool:
        hits = calibrate(root, children, pool)
        planned = plan(root, hits, points, runs_per_point, seed_base, recovery_kills=False)

        def progress(done: int, total: int) -> None:
            if done % 12 == 0 or done == total:
                crash_progress(f"{label}: {done}/{total} runs checked, {time.monotonic() - started:.0f} s")

        runs = execute_all(planned, children, pool, progress)
    return Sweep(runs, time.monotonic() - started)


def _report(label: str, sweep: Sweep) -> str:
    runs = sweep.runs
    return (f"{label}: {sweep.crashed} of {len(runs)} armed runs died by SIGKILL, "
            f"{sum(bool(r.violations) for r in runs)} with violations, {sum(r.error is not None for r in runs)} "
            f"errors, {sweep.seconds:.0f} s")


@pytest.fixture(scope="module")
def lmdb_sweep(tmp_path_factory: pytest.TempPathFactory, children: Children, crash_report: list[str],
               crash_progress: Callable[[str], None]) -> Iterator[Sweep]:
    root = tmp_path_factory.mktemp("history-crash-sweep")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(HISTORY_STORE_ENV, "lmdb")  # child_env copies os.environ: workload and checker alike
        sweep = run_sweep(root, children, crash_progress, "history crash sweep (lmdb)", POINTS, RUNS_PER_POINT, 7000)
    crash_report.append(_report("history crash sweep (lmdb)", sweep))
    yield sweep


@pytest.fixture(scope="module", params=sorted(COMPACTION_POINTS))
def compaction_sweep(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, children: Children,
                     crash_report: list[str], crash_progress: Callable[[str], None]
                     ) -> Iterator[tuple[str, Sweep]]:
    """The compaction's points of one history store: (the store, its sweep)."""
    store = request.param
    label = f"compaction crash sweep ({store}, max age {COMPACTION_MAX_AGE}s)"
    root = tmp_path_factory.mktemp(f"compaction-crash-sweep-{store}")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(HISTORY_STORE_ENV, store)
        mp.setenv(HISTORY_MAX_AGE_ENV, COMPACTION_MAX_AGE)
        sweep = run_sweep(root, children, crash_progress, label, COMPACTION_POINTS[store],
                          COMPACTION_RUNS_PER_POINT, 8000)
    crash_report.append(_report(label, sweep))
    yield store, sweep


def assert_recovered(sweep: Sweep, point: str, what: str) -> None:
    """Every run armed at ``point`` completed and recovered; two thirds of them really died there."""
    runs = sweep.of(point)
    errors = [r for r in runs if r.error]
    assert not errors, "runs that did not complete:\n" + _explain(errors)
    broken = [r for r in runs if r.violations]
    assert not broken, f"recovery ({what}) after a kill at {point} broke its promises:\n" + _explain(broken)
    crashed = sum(r.crashed for r in runs)
    assert crashed >= len(runs) * 2 // 3, f"only {crashed} of {len(runs)} runs armed at {point} really crashed"


@pytest.mark.parametrize("point", POINTS)
def test_history_on_disk_recovers_from_a_kill_at(lmdb_sweep: Sweep, point: str) -> None:
    assert_recovered(lmdb_sweep, point, "lmdb history")


def test_enough_history_crash_points_really_crashed(lmdb_sweep: Sweep) -> None:
    assert lmdb_sweep.crashed >= MIN_REAL_CRASHES, lmdb_sweep.crashed
    # the engine was really used: a checked run's data directory holds an LMDB history
    assert all((r.data_dir / "shard-0000" / "history" / "data.mdb").exists()
               for r in lmdb_sweep.runs if not r.error), "a run without an LMDB history file"


def test_a_kill_in_the_age_compaction_recovers_to_a_consistent_history(compaction_sweep: tuple[str, Sweep]) -> None:
    store, sweep = compaction_sweep
    for point in COMPACTION_POINTS[store]:
        assert_recovered(sweep, point, f"{store} history, age compaction")
