"""A replica group killed at exact failpoints: after any crash, an election finds every
acknowledged commit (specs/replication.md, R-1 and R-2).

A child process (``replica_workload.py``) runs a group of three members in one process
through a failover with a divergent tail cut and a member that lost its disk catching up
from a snapshot, and SIGKILLs itself at the Nth hit of one failpoint: the replication
points (``replica.*``: mid-truncation, mid-snapshot install, before a learner records that
it is a voter) and the WAL's and MANIFEST's. The check then reopens the three directories
as restarted members do (the term register read at start), elects the most complete voter
in a new term, and requires every commit the journal says was acknowledged, with its
value, and a new commit to succeed. A run whose N was never reached ends normally and is
checked too.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import msgpack
import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from replica_workload import REPLICAS, Journal, commit, elect, open_member, read_term  # noqa: E402

from oribus.messages import ReadRequest  # noqa: E402
from oribus.shards.replica import DirectNetwork  # noqa: E402
from oribus.types import SessionRef  # noqa: E402

pytestmark = pytest.mark.timeout(600)

WORKLOAD = HERE / "replica_workload.py"
POINTS = {  # failpoint -> armed hit counts (the calibration run gives the spread of the WAL's)
    "replica.before_truncate": (1,),
    "replica.after_truncate": (1,),
    "replica.install_snapshot": (1,),
    "replica.before_voter": (1,),
    "snapshot.after_rename": (1, 3),
    "manifest.before_rename": (5, 15, 25),
}
WAL_POINT = "wal.after_fsync"
WAL_RUNS = 8
PARALLEL = 2
CHILD_TIMEOUT = 60.0


def run_child(root: Path, seed: int, arm: str | None, hits_out: Path | None = None) -> int:
    """One workload run in ``root`` (the group in ``root/data``, the journal ``root/journal``);
    returns its exit code: 0, or -SIGKILL when it died at the armed point."""
    root.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "ORIBUS_FAILPOINTS": arm or ""}
    cmd = [sys.executable, str(WORKLOAD), str(root / "data"), str(root / "journal"), str(seed)]
    if hits_out is not None:
        cmd += ["--hits-out", str(hits_out)]
    done = subprocess.run(cmd, env=env, timeout=CHILD_TIMEOUT, capture_output=True, text=True)
    if done.returncode not in (0, -signal.SIGKILL):
        raise AssertionError(f"{arm}: the workload failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done.returncode


async def check_group(root: Path) -> tuple[int, int]:
    """Reopen, elect, read back every acknowledged commit; returns (acknowledged, term)."""
    data = root / "data"
    events = [json.loads(line) for line in (root / "journal").read_text().splitlines() if line.strip()]
    acknowledged = {e["key"]: e["value"] for e in events if e["ev"] == "ok"}
    net = DirectNetwork()
    members = {i: await open_member(data, i, net) for i in range(REPLICAS)}
    try:
        voters = [i for i, m in members.items() if m.voter]
        assert len(voters) >= 2, f"fewer than a majority of voters after the crash: {voters}"
        _, shard = await elect(data, members, net, voters[0])
        reply = await shard.read(ReadRequest(SessionRef("check", "r"), sorted(acknowledged), record=False))
        found = {i.key: msgpack.unpackb(i.value) for i in reply.items if i.value is not None}
        missing = {k: v for k, v in acknowledged.items() if found.get(k) != v}
        assert not missing, f"acknowledged commits lost or changed: {missing}"
        await commit(shard, Journal(root / "journal"), "after-crash", "after-crash", 1)
        return len(acknowledged), read_term(data)
    finally:
        for m in members.values():
            await m.close()


def sweep(tmp_path: Path) -> list[tuple[str, int, int]]:
    calibration = tmp_path / "calibration"
    assert run_child(calibration, 1, None, tmp_path / "hits.json") == 0
    hits = json.loads((tmp_path / "hits.json").read_text())
    for point in POINTS:
        assert hits.get(point, 0) >= 1, f"the workload never reaches {point}: {hits}"
    runs = [(point, n) for point, ns in POINTS.items() for n in ns]
    total = hits[WAL_POINT]
    runs += [(WAL_POINT, max(1, total * (k + 1) // (WAL_RUNS + 1))) for k in range(WAL_RUNS)]

    def one(index: int, point: str, n: int) -> tuple[str, int, int]:
        root = tmp_path / f"run-{index}"
        code = run_child(root, 100 + index, f"{point}=kill@{n}")
        return point, n, code

    with ThreadPoolExecutor(PARALLEL) as pool:
        results = list(pool.map(lambda args: one(*args), [(i, p, n) for i, (p, n) in enumerate(runs)]))
    return results


def test_every_acknowledged_commit_survives_a_crash_at_any_replication_point(tmp_path) -> None:
    results = sweep(tmp_path)
    killed = {point for point, _n, code in results if code == -signal.SIGKILL}
    assert killed >= {*POINTS, WAL_POINT}, f"some points were never reached by an armed run: {results}"
    for index, (point, n, _code) in enumerate(results):
        root = tmp_path / f"run-{index}"
        try:
            asyncio.run(check_group(root))
        except (AssertionError, TimeoutError) as e:
            raise AssertionError(f"after a kill at {point}@{n} ({root}): {type(e).__name__}: {e}") from e


def test_the_check_fails_when_an_acknowledged_commit_is_missing(tmp_path) -> None:
    root = tmp_path / "run"
    assert run_child(root, 7, None) == 0
    Journal(root / "journal").write(ev="ok", id="never", key="never-committed", value=1)
    with pytest.raises(AssertionError, match="never-committed"):
        asyncio.run(check_group(root))
