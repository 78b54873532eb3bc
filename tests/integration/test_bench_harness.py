"""The comparison harness (benchmarks/compare.py) on the embedded engine, and its audit.

No peer server is needed: the harness runs the ``oribus-embedded`` backend
for about a second per point and must write results.json / results.md /
machine.md with a passing audit. The audit itself must be honest: a client
that writes blind (lost updates) and one whose other reads go unchecked
(stale commits accepted) must fail it, and hand-made histories with a lost
update, a stale commit and a write skew must be caught.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

from harness.audit import History, audit  # noqa: E402
from harness.cpu import CpuMeter, session_cpu_seconds  # noqa: E402
from harness.runner import RunOptions, run_point  # noqa: E402
from harness.workloads import KeyPicker, Point, key_name  # noqa: E402
from peers.base import Outcome  # noqa: E402
from peers.oribus_embedded import OribusClient, OribusEmbedded  # noqa: E402

from oribus import Conflict  # noqa: E402


@pytest.mark.slow  # a whole (short) comparison run
def test_compare_embedded_writes_results_and_passes_audit(tmp_path: Path) -> None:
    out = tmp_path / "out"
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(BENCH / "compare.py"), "--backends", "oribus-embedded",
         "--scenarios", "agent-step", "read-only", "contention", "--sweep", "contention=0.9",
         "--duration", "1", "--warmup", "0.2", "--clients", "8", "--keys", "200",
         # two shards: a step's reads and commit then span awaits, so hot keys collide (with
         # one embedded shard a step runs without suspending between them: no conflicts)
         "--shards", "2",
         "--out", str(out), "--work-dir", str(tmp_path), "--no-progress", "--no-plots"],
        capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert time.monotonic() - t0 < 60

    doc = json.loads((out / "results.json").read_text())
    assert doc["backend_order"] == ["oribus-embedded"]
    assert doc["backends"]["oribus-embedded"]["shards"] == 2
    durability = doc["backends"]["oribus-embedded"]["durability"]
    assert durability["unsafe_no_fsync"] is False and durability["wal_fsyncs_for_one_commit"] >= 1
    runs = {r["point"]["workload"] + f"/{r['point']['hot']:g}": r for r in doc["runs"]}
    assert set(runs) == {"agent-step/0", "read-only/0", "agent-step/0.9"}
    for r in runs.values():
        assert r["status"] == "ok", r
        assert r["audit"]["ok"], r["audit"]
        assert r["committed"] > 0 and r["committed_per_s"] > 0
        assert 0 < r["p50_ms"] <= r["p95_ms"] <= r["p99_ms"]
        assert len(r["latency_cdf_ms"]) == 101
        # the embedded engine runs in the harness's process: its CPU is the client's
        assert r["cpu_ms_per_op"] > 0 and r["client_cpu"] > 0 and r["server_cpu"] == 0
    step = runs["agent-step/0"]
    assert step["audit"]["acknowledged"] >= step["committed"]
    assert step["audit"]["lost_updates"] == step["audit"]["stale_commits"] == 0
    assert runs["read-only/0"]["audit"]["reads_checked"] > 0
    assert runs["agent-step/0.9"]["conflicts"] > 0  # 90% of picks from 2 hot keys: they collide

    md = (out / "results.md").read_text()
    assert "| agent-step | oribus-embedded |" in md
    assert "| oribus-embedded | oribus " in md and "| 2 shards |" in md  # the backends table
    assert "3 runs passed the audit" in md and "0 failed" in md
    assert "## Sweep: contention" in md
    machine = (out / "machine.md").read_text()
    assert "CPU:" in machine and "fdatasync" in machine and "oribus-embedded" in machine
    assert not list(tmp_path.glob("oribus-compare-*")), "the work directory was left behind"


def test_cpu_meter_counts_a_server_session_and_nothing_else() -> None:
    # a busy child in a session of its own (as ServerProcess starts servers), an idle one,
    # and one that ends during the window (its CPU must not count negative)
    spin = "while True: pass"
    busy = subprocess.Popen([sys.executable, "-c", spin], start_new_session=True)
    idle = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], start_new_session=True)
    brief = subprocess.Popen([sys.executable, "-c", spin], start_new_session=True)
    try:
        time.sleep(0.3)  # all past their start-up
        meter = CpuMeter({busy.pid})
        idle_meter = CpuMeter({idle.pid})
        ended_meter = CpuMeter({brief.pid})
        for m in (meter, idle_meter, ended_meter):
            m.start()
        brief.kill()
        brief.wait()
        time.sleep(0.6)
        for m in (meter, idle_meter, ended_meter):
            m.stop()
    finally:
        for p in (busy, idle, brief):
            p.kill()
            p.wait()
    assert meter.server > 0.1  # most of 0.6 s of spinning, shared with whatever else runs
    assert idle_meter.server < 0.05
    assert ended_meter.server == 0.0
    assert session_cpu_seconds({idle.pid}) == 0.0  # gone: nothing left to count


def test_cpu_meter_counts_the_pages_a_server_and_the_client_grow_into() -> None:
    # a server that maps and writes 64 MiB during the window, one that stays idle
    grow = ("import mmap, sys, time; sys.stdin.readline(); m = mmap.mmap(-1, 64 << 20); "
            "[m.__setitem__(i, 1) for i in range(0, 64 << 20, 4096)]; print('done', flush=True); time.sleep(30)")
    grower = subprocess.Popen([sys.executable, "-c", grow], start_new_session=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    idle = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], start_new_session=True)
    try:
        time.sleep(0.3)  # both past their start-up
        meter = CpuMeter({grower.pid})
        idle_meter = CpuMeter({idle.pid})
        meter.start()
        idle_meter.start()
        grower.stdin.write("go\n")
        grower.stdin.flush()
        assert grower.stdout.readline().strip() == "done"
        own = bytearray(32 << 20)  # the client grows too: 32 MiB, zeroed
        meter.stop()
        idle_meter.stop()
        del own
    finally:
        for p in (grower, idle):
            p.kill()
            p.wait()
    pages = (64 << 20) // 4096
    assert pages <= meter.server_faults < pages * 1.5, meter.server_faults
    assert idle_meter.server_faults < 100, idle_meter.server_faults
    assert meter.client_faults >= (32 << 20) // 4096 * 0.9, meter.client_faults


# ---- the audit catches what a broken backend does ------------------------------------------------


async def _run(backend, tmp_path: Path, point: Point) -> dict:
    await backend.start(tmp_path / backend.name)
    try:
        result = await run_point(backend, point, RunOptions(duration=1.0, warmup=0.2, max_retries=5))
    finally:
        await backend.stop()
    assert result.status == "ok", result.reason
    return result.audit


SMALL = Point(clients=16, keys=10)  # 3 keys of 10 per step: steps collide all the time


async def test_blind_writes_fail_the_audit(tmp_path: Path) -> None:
    report = await _run(OribusEmbedded(unsafe_blind_write=True), tmp_path, SMALL)
    assert not report["ok"]
    assert report["lost_updates"] > 0 and report["duplicate_versions"] > 0
    assert any("written by two acknowledged commits" in p for p in report["problems"])


class UncheckedReadsClient(OribusClient):
    """Validates only the key it writes: the other reads are made outside the transaction."""

    async def step(self, read_keys: Sequence[str], write_keys: Sequence[str], session: int) -> Outcome:
        s = self.sessions.get(session)
        tx = s.transaction()
        others = [k for k in read_keys if k not in write_keys]
        items = dict(await s.get_many(others)) if others else {}
        items.update(await tx.get_many(write_keys))
        await asyncio.sleep(0.001)  # others commit meanwhile
        seen = {k: items[k].value["n"] for k in read_keys}
        written = {k: seen[k] + 1 for k in write_keys}
        for k in write_keys:
            tx.put(k, {"n": written[k], "pad": items[k].value["pad"]})
        sent = time.perf_counter()
        try:
            await tx.commit()
        except Conflict:
            return Outcome(False, seen, {}, sent)
        return Outcome(True, seen, written, sent)


class UncheckedReads(OribusEmbedded):
    async def client(self):
        return UncheckedReadsClient(self.pool)


async def test_stale_reads_fail_the_audit_without_lost_updates(tmp_path: Path) -> None:
    report = await _run(UncheckedReads(), tmp_path, SMALL)
    assert not report["ok"]
    assert report["lost_updates"] == 0 and report["duplicate_versions"] == 0  # the written key is checked
    assert report["stale_commits"] > 0 or report["cycle_commits"] > 0
    assert any("stale commit accepted" in p or "not serializable" in p for p in report["problems"])


async def test_correct_client_passes_the_same_contention(tmp_path: Path) -> None:
    report = await _run(OribusEmbedded(), tmp_path, SMALL)
    assert report["ok"], report["problems"]
    assert report["acknowledged"] > 0


async def test_a_backend_that_never_suspends_still_ends_its_window(tmp_path: Path) -> None:
    # one embedded shard serves a read from memory without suspending: the workers must
    # still let the window's timer run (this hung before the runner yielded per step)
    backend = OribusEmbedded(shards=1)
    await backend.start(tmp_path / backend.name)
    try:
        result = await asyncio.wait_for(
            run_point(backend, Point(workload="read-only", clients=4, keys=50),
                      RunOptions(duration=0.5, warmup=0.1)), timeout=60)
    finally:
        await backend.stop()
    assert result.status == "ok" and result.committed > 0
    assert result.audit["ok"] and result.audit["reads_checked"] > 0


# ---- the audit on hand-made histories --------------------------------------------------------


KEYS = [key_name(i) for i in range(3)]
X, Y, Z = KEYS


def history(*commits: tuple[float, float, dict, dict]) -> History:
    h = History(KEYS)
    for sent, acked, seen, written in commits:
        h.committed(Outcome(True, seen, written, sent), acked)
    return h


def test_audit_accepts_a_serial_history() -> None:
    h = history((1.0, 1.1, {X: 0, Y: 0}, {X: 1}), (2.0, 2.1, {X: 1, Y: 0}, {Y: 1}))
    report = audit(h, [1, 1, 0])
    assert report.ok, report.problems


def test_audit_finds_a_lost_update() -> None:
    h = history((1.0, 1.1, {X: 0}, {X: 1}), (1.0, 1.2, {X: 0}, {X: 1}))
    report = audit(h, [1, 0, 0])
    assert not report.ok and report.lost_updates == 1 and report.duplicate_versions == 1


def test_audit_finds_a_refused_commit_applied_and_allows_unknown_outcomes() -> None:
    h = history((1.0, 1.1, {X: 0}, {X: 1}))
    assert audit(h, [2, 0, 0]).applied_unacknowledged == 1
    h.outcome_unknown([X])
    assert audit(h, [2, 0, 0]).ok


def test_audit_finds_a_stale_commit() -> None:
    # the second commit read Y@0 after the first had already made it Y=1
    h = history((1.0, 1.1, {Y: 0}, {Y: 1}), (2.0, 2.1, {X: 0, Y: 0}, {X: 1}))
    report = audit(h, [1, 1, 0])
    assert not report.ok and report.stale_commits == 1 and report.lost_updates == 0


def test_audit_finds_write_skew_with_overlapping_commits() -> None:
    # both read X and Y at 0; one writes X, the other Y; their commit windows overlap
    h = history((1.0, 2.0, {X: 0, Y: 0}, {X: 1}), (1.5, 2.5, {X: 0, Y: 0}, {Y: 1}))
    report = audit(h, [1, 1, 0])
    assert not report.ok and report.stale_commits == 0 and report.cycle_commits == 2
    assert "not serializable" in report.problems[0]


def test_key_picker_hot_set() -> None:
    import random

    keys = [key_name(i) for i in range(1000)]
    picker = KeyPicker(keys, 3, hot=1.0)
    rng = random.Random(1)
    for _ in range(200):
        picked = picker.pick(rng)
        assert len(set(picked)) == 3
        assert sum(k < key_name(10) for k in picked) == 3  # the hot 1%: the first 10 keys
    assert len(set(KeyPicker(keys, 64, hot=0.0).pick(rng))) == 64


@pytest.mark.parametrize("workload,writes", [("agent-step", 1), ("cross-shard", 3), ("read-only", 0)])
def test_points_are_canonical(workload: str, writes: int) -> None:
    p = Point(workload=workload).canonical()
    assert p.writes == writes and p.sessions == p.clients
    assert Point(workload=workload).id == p.id


# ---- the targets, decided on a run's own figures ----------------------------------------------


def _doc_with(rates: dict[tuple[str, str], tuple[float, float, float]]) -> dict:
    """A results document: (backend, point) -> (commit/s, p50 ms, p99 ms), every run audited ok."""
    scenarios = [
        {"name": "agent-step", "param": None, "values": [None], "points": ["base"]},
        {"name": "contention", "param": "hot", "values": [0.0, 0.5], "points": ["base", "hot"]},
        {"name": "read-set", "param": "reads", "values": [1, 4, 16], "points": ["r1", "r4", "r16"]},
        {"name": "sessions", "param": "sessions", "values": [10, 10000], "points": ["s10", "s10k"]},
    ]
    runs = [{"backend": b, "point_id": pid, "status": "ok", "audit": {"ok": True},
             "committed_per_s": c, "p50_ms": p50, "p99_ms": p99, "retries_per_commit": 0.1}
            for (b, pid), (c, p50, p99) in rates.items()]
    return {"scenarios": scenarios, "runs": runs}


def test_targets_are_decided_on_the_runs_figures() -> None:
    from harness import targets

    rates = {
        ("oribus-embedded", "base"): (3000, 4, 10), ("postgres", "base"): (1900, 10, 50),
        ("redis-always", "base"): (3100, 8, 20), ("oribus-up", "base"): (2000, 9, 30),
        ("oribus-embedded", "hot"): (2000, 5, 20), ("redis-always", "hot"): (1500, 9, 80),
        ("oribus-embedded", "r1"): (4000, 2, 5), ("oribus-embedded", "r4"): (3000, 7.9, 15),
        ("oribus-embedded", "r16"): (900, 33, 60),  # 33 > 16 x 2: faster than linear
        ("oribus-embedded", "s10"): (3000, 4, 10), ("oribus-embedded", "s10k"): (2500, 5, 12),
    }
    by_name = {t.name: t for t in targets.check(_doc_with(rates))}
    assert by_name["agent-step: embedded ≥ 1.5× PostgreSQL"].met is True  # 1.58x
    assert by_name["agent-step: embedded ≥ 1.0× Redis (always)"].met is False  # 0.97x
    assert "0.97×" in by_name["agent-step: embedded ≥ 1.0× Redis (always)"].measured
    assert by_name["agent-step: embedded p99 ≤ Redis's"].met is True
    assert by_name["agent-step: oribus up ≥ 1.0× PostgreSQL"].met is True
    assert by_name["hot=0.5: oribus-embedded commits ≥ Redis's, retries/commit ≤ Redis's"].met is True
    assert by_name["hot=0.5: oribus-up commits ≥ Redis's, retries/commit ≤ Redis's"].met is None  # not run
    linear = by_name["read-set: oribus-embedded p50 grows at most linearly (p50(n) ≤ n × p50(1))"]
    assert linear.met is False and "1.03" in linear.measured
    assert by_name["sessions: oribus-embedded throughput within 20% over the sweep"].met is True  # 0.83

    rates[("oribus-embedded", "s10k")] = (2300, 5, 12)  # 0.77 of the fastest
    rates[("oribus-embedded", "r16")] = (900, 30, 60)
    by_name = {t.name: t for t in targets.check(_doc_with(rates))}
    assert by_name["sessions: oribus-embedded throughput within 20% over the sweep"].met is False
    assert by_name["read-set: oribus-embedded p50 grows at most linearly (p50(n) ≤ n × p50(1))"].met is True
    rows = [t.__dict__ for t in targets.check(_doc_with(rates))]
    md = "\n".join(targets.markdown(rows))
    assert "| MISSED |" in md and "| met |" in md and "| not measured |" in md
