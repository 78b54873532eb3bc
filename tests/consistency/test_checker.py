"""The history checker (``oribus.checker``): hand-written histories, the real engine, broken engines.

1. Hand-written histories: each anomaly class is reported, and clean
   histories (with failed and unknown-outcome transactions) are not.
2. The list-append workload on the embedded engine: no anomaly.
3. Deliberately broken engines, each of which the checker must flag:
   a) read validation switched off (``unsafe_disable_validation``): lost
      updates, i.e. dependency cycles;
   b) a two-phase commit applied on its primary shard only: the other
      participants are told to abort, so readers see part of a commit and
      acknowledged appends vanish;
   c) acknowledging before fsync (``unsafe_no_fsync``) followed by a power
      loss, simulated as explained in ``test_power_loss_*``.

This file is also the child process of the power-loss tests:
``python test_checker.py power-loss-child DATA HISTORY SYNCS NO_FSYNC TXNS``.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import oribus
from oribus.checker import (
    HistoryError,
    Recorder,
    check,
    read_history,
    record_final,
    run_list_append,
)
from oribus.checker.check import ORI_KINDS
from oribus.client.session import AsyncSession
from oribus.hosts.embedded import EmbeddedEngine, EngineConfig

CLIENTS = 8
ENGINE_TXNS = 1500
BROKEN_TXNS = 400
POWER_LOSS_TXNS = 300
POWER_LOSS_SHARDS = 2


def _figures(label: str, report: Any) -> None:
    """One line per engine run (visible with ``pytest -s``): what was checked and found."""
    print(f"\n[{label}] {report.counts['transactions']} transactions, {report.counts['committed']} committed; "
          f"anomalies: {report.by_kind() or 'none'}")


# ---- hand-written histories ------------------------------------------------------------------


class H:
    """Builds a history. ``ops`` are completed ops: ``["r", k, value, version]``, ``["append", k, e, version]``."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self._next = 1
        self._ops: dict[int, list[list[Any]]] = {}

    def invoke(self, ops: list[list[Any]], process: str = "p") -> int:
        tid = self._next
        self._next += 1
        invoked = [[f, k, None if f == "r" else arg] for f, k, arg, *_ in ops]
        self.events.append({"type": "invoke", "id": tid, "process": process, "session": [process, "s"],
                            "time": float(len(self.events)), "ops": invoked})
        self._ops[tid] = ops
        return tid

    def ok(self, tid: int, commit_id: str | None = None) -> None:
        self.events.append({"type": "ok", "id": tid, "commit_id": commit_id or f"c{tid}",
                            "ops": [list(op) for op in self._ops[tid]]})

    def fail(self, tid: int, error: str = "Conflict") -> None:
        self.events.append({"type": "fail", "id": tid, "error": error, "commit_id": f"c{tid}"})

    def info(self, tid: int) -> None:
        self.events.append({"type": "info", "id": tid, "error": "Unavailable", "commit_id": f"c{tid}"})

    def txn(self, *ops: list[Any], outcome: str = "ok") -> int:
        tid = self.invoke(list(ops))
        getattr(self, outcome)(tid)
        return tid

    def final(self, state: dict[str, list[Any]], history: dict[str, list[list[Any]]]) -> None:
        self.events.append({"type": "final", "state": state, "history": history})


def kinds(events: list[dict[str, Any]]) -> dict[str, int]:
    return check(events).by_kind()


def test_clean_serial_history_passes() -> None:
    h = H()
    h.txn(["r", "x", None, 0], ["append", "x", 1, 1])
    h.txn(["r", "x", [1], 1], ["r", "y", None, 0], ["append", "y", 2, 1], ["append", "x", 3, 2])
    h.txn(["r", "x", [1, 3], 2], ["r", "y", [2], 1])
    h.final({"x": [[1, 3], 2], "y": [[2], 1]},
            {"x": [[1, "c1", [1]], [2, "c2", [1, 3]]], "y": [[1, "c2", [2]]]})
    report = check(h.events)
    assert report.ok, report.summary()
    assert report.counts["committed"] == 3 and report.counts["edges"] > 0


def test_clean_concurrent_history_with_failed_and_unknown_transactions_passes() -> None:
    h = H()
    # concurrent T1, T2 on different keys, both committed
    t1 = h.invoke([["r", "x", None, 0], ["append", "x", 1, 1]])
    t2 = h.invoke([["r", "y", None, 0], ["append", "y", 2, 1]])
    h.ok(t2)
    h.ok(t1)
    # T3: outcome unknown, but its append is visible later: it committed
    t3 = h.invoke([["r", "x", [1], 1], ["append", "x", 3, 2]])
    h.info(t3)
    # T4: outcome unknown, never visible: left out
    t4 = h.invoke([["r", "y", [2], 1], ["append", "y", 4, None]])
    h.info(t4)
    # T5: refused
    h.txn(["r", "x", [1], 1], ["append", "x", 5, None], outcome="fail")
    h.txn(["r", "x", [1, 3], 2], ["r", "y", [2], 1])
    h.final({"x": [[1, 3], 2], "y": [[2], 1]},
            {"x": [[1, "c1", [1]], [2, "c3", [1, 3]]], "y": [[1, "c2", [2]]]})
    report = check(h.events)
    assert report.ok, report.summary()
    assert report.counts["info"] == 2 and report.counts["info_committed"] == 1
    assert report.counts["committed"] == 4 and report.counts["fail"] == 1


def test_clean_register_history_passes() -> None:
    h = H()
    h.txn(["r", "a", None, 0], ["w", "a", "a1", 1])
    h.txn(["r", "a", "a1", 1], ["w", "b", "b1", 1])
    h.txn(["r", "a", "a1", 1], ["r", "b", "b1", 1], ["w", "a", "a2", 2])
    h.final({"a": ["a2", 2], "b": ["b1", 1]},
            {"a": [[1, "c1", "a1"], [2, "c3", "a2"]], "b": [[1, "c2", "b1"]]})
    report = check(h.events)
    assert report.ok, report.summary()


def test_g0_write_cycle() -> None:
    h = H()
    t1 = h.invoke([["append", "x", 1, 1], ["append", "y", 2, 2]])
    t2 = h.invoke([["append", "x", 3, 2], ["append", "y", 4, 1]])
    h.ok(t1)
    h.ok(t2)
    h.final({"x": [[1, 3], 2], "y": [[4, 2], 2]},
            {"x": [[1, "c1", [1]], [2, "c2", [1, 3]]], "y": [[1, "c2", [4]], [2, "c1", [4, 2]]]})
    assert kinds(h.events) == {"G0": 1}


def test_g1a_aborted_read() -> None:
    h = H()
    h.txn(["r", "x", None, 0], ["append", "x", 1, None], outcome="fail")
    h.txn(["r", "x", [1], 1])
    assert kinds(h.events) == {"G1a": 1}


def test_g1a_failed_write_in_final_history() -> None:
    h = H()
    h.txn(["w", "x", "v1", None], outcome="fail")
    h.final({"x": ["v1", 1]}, {"x": [[1, "c1", "v1"]]})
    assert "G1a" in kinds(h.events)


def test_g1b_intermediate_read() -> None:
    h = H()
    h.txn(["r", "x", None, 0], ["append", "x", 1, 1], ["append", "x", 2, 1])
    h.txn(["r", "x", [1], 1])
    assert "G1b" in kinds(h.events)


def test_fractured_read() -> None:
    h = H()
    h.txn(["append", "x", 1, 1], ["append", "y", 2, 1])
    h.txn(["r", "x", [1], 1], ["r", "y", None, 0])
    found = kinds(h.events)
    assert found.get("fractured-read") == 1, found


def test_fractured_read_of_registers() -> None:
    h = H()
    h.txn(["w", "x", "x1", 1], ["w", "y", "y1", 1])
    h.txn(["r", "x", "x1", 1], ["r", "y", None, 0])
    assert "fractured-read" in kinds(h.events)


def test_g1c_circular_information_flow() -> None:
    h = H()
    t1 = h.invoke([["r", "y", [2], 1], ["append", "x", 1, 1]])
    t2 = h.invoke([["r", "x", [1], 1], ["append", "y", 2, 1]])
    h.ok(t1)
    h.ok(t2)
    assert kinds(h.events) == {"G1c": 1}


def test_g_single_lost_update() -> None:
    h = H()
    t1 = h.invoke([["r", "x", None, 0], ["append", "x", 1, 1]])
    t2 = h.invoke([["r", "x", None, 0], ["append", "x", 2, 2]])
    h.ok(t1)
    h.ok(t2)
    h.final({"x": [[2], 2]}, {"x": [[1, "c1", [1]], [2, "c2", [2]]]})
    found = kinds(h.events)
    assert found.get("G-single") == 1, found
    assert found.get("lost-write") == 1 and found.get("incompatible-order"), found


def test_g_single_read_skew_of_registers() -> None:
    h = H()
    t1 = h.invoke([["r", "x", None, 0], ["r", "y", "y2", 2]])  # x before T3, y after it
    h.txn(["w", "y", "y1", 1])
    h.txn(["w", "x", "x1", 1], ["w", "y", "y2", 2])
    h.ok(t1)
    found = kinds(h.events)
    assert found.get("G-single") == 1 and found.get("fractured-read") == 1, found


def test_g2_write_skew() -> None:
    h = H()
    t1 = h.invoke([["r", "x", None, 0], ["r", "y", None, 0], ["append", "x", 1, 1]])
    t2 = h.invoke([["r", "x", None, 0], ["r", "y", None, 0], ["append", "y", 2, 1]])
    h.ok(t1)
    h.ok(t2)
    assert kinds(h.events) == {"G2": 1}


def test_realtime_stale_read() -> None:
    h = H()
    h.txn(["append", "x", 1, 1])
    h.txn(["r", "x", None, 0])  # began after T1 was acknowledged, yet did not see it
    assert kinds(h.events) == {"G-single-realtime": 1}


def test_concurrent_read_of_older_version_is_fine() -> None:
    h = H()
    t1 = h.invoke([["append", "x", 1, 1]])
    t2 = h.invoke([["r", "x", None, 0]])
    h.ok(t1)
    h.ok(t2)
    assert check(h.events).ok


def test_incompatible_list_order() -> None:
    h = H()
    h.txn(["append", "x", 1, 1])
    h.txn(["append", "x", 2, 2])
    h.txn(["append", "x", 3, 3])
    h.txn(["r", "x", [1, 2], 2])
    h.txn(["r", "x", [1, 3], 3])
    assert "incompatible-order" in kinds(h.events)


def test_lost_acknowledged_write() -> None:
    h = H()
    h.txn(["r", "x", None, 0], ["append", "x", 1, 1])
    h.txn(["r", "x", [1], 1], ["append", "x", 2, 2])
    h.final({"x": [[1], 1]}, {"x": [[1, "c1", [1]]]})
    found = kinds(h.events)
    assert found.get("lost-write") == 1, found


def test_lost_register_write_overwritten_at_its_version() -> None:
    h = H()
    h.txn(["w", "x", "mine", 1])
    h.final({"x": ["other", 1]}, {"x": [[1, "c-other", "other"]]})
    found = kinds(h.events)
    assert found.get("lost-write") == 1, found


def test_truncated_history_is_not_a_lost_write() -> None:
    h = H()
    for i in range(1, 5):
        h.txn(["w", "x", f"v{i}", i])
    h.final({"x": ["v4", 4]}, {"x": [[3, "c3", "v3"], [4, "c4", "v4"]]})
    report = check(h.events)
    assert report.ok, report.summary()
    assert report.counts["unverifiable_writes"] == 2 and any("could not be checked" in n for n in report.notes)


def test_duplicate_commit_id_in_history() -> None:
    h = H()
    h.txn(["w", "x", "v", 1])
    h.final({"x": ["v", 2]}, {"x": [[1, "c1", "v"], [2, "c1", "v"]]})
    assert "duplicate-commit" in kinds(h.events)


def test_duplicate_element_in_list() -> None:
    h = H()
    h.txn(["r", "x", None, 0], ["append", "x", 1, 1])
    h.final({"x": [[1, 1], 2]}, {"x": [[1, "c1", [1]], [2, "c1", [1, 1]]]})
    assert kinds(h.events).get("duplicate-commit") == 2  # the list, and the commit id twice


def test_version_gap_in_final_history() -> None:
    h = H()
    h.txn(["w", "x", "a", 1])
    h.txn(["w", "x", "b", 3])
    h.final({"x": ["b", 3]}, {"x": [[1, "c1", "a"], [3, "c2", "b"]]})
    assert "version-gap" in kinds(h.events)


def test_observed_version_beyond_final_is_a_gap() -> None:
    h = H()
    h.txn(["w", "x", "a", 1])
    h.txn(["r", "x", "a", 1])
    h.final({"x": [None, 0]}, {"x": []})
    found = kinds(h.events)
    assert found.get("version-gap") == 1 and found.get("lost-write") == 1, found


def test_two_transactions_claim_one_version() -> None:
    h = H()
    t1 = h.invoke([["append", "x", 1, 1]])
    t2 = h.invoke([["append", "x", 2, 1]])
    h.ok(t1)
    h.ok(t2)
    assert "version-conflict" in kinds(h.events)


def test_garbage_read() -> None:
    h = H()
    h.txn(["r", "x", [99], 1])
    assert kinds(h.events) == {"garbage-read": 1}


def test_acknowledged_commit_missing_a_written_version() -> None:
    """Seen with ``oribus up --processes`` and shard kills: an agent's step wrote its update
    ``u/1/3/65`` and its counter ``ctr/3`` (on another shard) and was acknowledged with
    ``{'ctr/3': 65}``: the version of ``u/1/3/65`` was missing from the result."""
    h = H()
    h.txn(["w", "u/1/3/65", "step 65 of agent 1", None], ["w", "ctr/3", 65, 65])
    found = check(h.events)
    assert found.by_kind() == {"incomplete-result": 1}, found.summary()
    assert "u/1/3/65" in found.anomalies[0].message and "ctr/3" in found.anomalies[0].message
    # a client that reports no version at all, and a failed or unknown commit, are not held to it
    h = H()
    h.txn(["w", "u/1/3/66", "step 66 of agent 1", None], ["w", "ctr/3", 66, None])
    h.txn(["w", "u/1/3/67", "step 67 of agent 1", None], ["w", "ctr/3", 67, None], outcome="fail")
    h.txn(["append", "la/k1", 1, 1], ["append", "la/k1", 2, 1], ["append", "la/k2", 3, 1])
    assert kinds(h.events) == {}


def test_malformed_histories_are_refused(tmp_path: Path) -> None:
    with pytest.raises(HistoryError, match="not invoked"):
        check([{"type": "ok", "id": 1, "ops": []}])
    with pytest.raises(HistoryError, match="do not match"):
        check([{"type": "invoke", "id": 1, "ops": [["r", "x", None]]},
               {"type": "ok", "id": 1, "ops": [["append", "x", 1, 1]]}])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"type": "invoke", "id": 1, "ops": [["r", "x", null]]}\n{nope\n')
    with pytest.raises(HistoryError, match=r"bad.jsonl:2: not JSON"):
        read_history(bad)


def test_cli_exit_codes(tmp_path: Path, capsys: Any) -> None:
    from oribus.cli import main

    clean, broken = H(), H()
    clean.txn(["append", "x", 1, 1])
    broken.txn(["append", "x", 1, 1])
    broken.txn(["r", "x", None, 0])
    for name, h in (("clean", clean), ("broken", broken)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(e) + "\n" for e in h.events))
    assert main(["check", str(tmp_path / "clean.jsonl")]) == 0
    assert "no anomalies" in capsys.readouterr().out
    assert main(["check", str(tmp_path / "broken.jsonl"), "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is False and out["by_kind"] == {"G-single-realtime": 1}
    assert out["anomalies"][0]["edges"] and out["anomalies"][0]["ops"]
    assert main(["check", str(tmp_path / "missing.jsonl")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_recorder_is_thread_safe_and_round_trips(tmp_path: Path) -> None:
    rec = Recorder()

    def client(n: int) -> None:
        for i in range(200):
            tid = rec.invoke(f"t{n}", ["a", str(n)], [["append", "x", n * 1000 + i]])
            rec.ok(tid, [["append", "x", n * 1000 + i, None]], f"c{n}-{i}")

    threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rec.final({"x": [[], 0]}, {"x": []})
    path = tmp_path / "h.jsonl"
    rec.dump(path)
    events = read_history(path)
    assert events == rec.events and len(events) == 4 * 200 * 2 + 1
    report = check(events)
    # every append acknowledged, none in the final state: the checker must say so
    assert report.by_kind() == {"lost-write": 800}


# ---- the real engine ---------------------------------------------------------------------------


async def _list_append_run(root: AsyncSession, txns: int, seed: int) -> tuple[Recorder, dict[str, int]]:
    rec = Recorder()
    sessions = [root.session(agent=f"client-{i}") for i in range(CLIENTS)]
    outcomes = await run_list_append(sessions, rec, txns=txns, seed=seed)
    await record_final(root, rec)
    return rec, outcomes


async def test_engine_list_append_has_no_anomalies(tmp_path: Path) -> None:
    async with oribus.open_local(tmp_path / "data", shards=3, agent="checker") as root:
        rec, outcomes = await _list_append_run(root, ENGINE_TXNS, seed=11)
        stats = await root.stats()
    report = check(rec.events)
    _figures("engine", report)
    assert report.ok, report.summary()
    assert outcomes["ok"] + outcomes["fail"] + outcomes["info"] == ENGINE_TXNS
    # the run must exercise what is checked: many commits, many conflicts, two-phase commits
    assert report.counts["committed"] >= ENGINE_TXNS // 3 and outcomes["fail"] >= 50
    assert stats["coordinator"]["commits_2pc"] > 20
    path = tmp_path / "history.jsonl"
    rec.dump(path)
    from oribus.cli import main

    assert main(["check", str(path)]) == 0


async def test_engine_without_read_validation_is_flagged(tmp_path: Path) -> None:
    async with oribus.open_local(tmp_path / "data", shards=3, agent="checker",
                                 unsafe_disable_validation=True) as root:
        rec, _ = await _list_append_run(root, BROKEN_TXNS, seed=12)
    report = check(rec.events)
    _figures("no read validation", report)
    assert report.of_kind(*ORI_KINDS), report.summary()


class PrimaryOnlyCommits:
    """A shard, as the coordinator sees it, that aborts every commit it is told to finish.

    The coordinator decides on the primary (which applies the commit) and then
    calls ``finish`` on the other participants: here they release the
    transaction without applying it. Recovery reaches shards through the same
    objects, so it cannot repair the damage either: the commit stays applied on
    its primary shard only.
    """

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.dropped = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def finish(self, txn_id: str, commit: bool) -> Any:
        self.dropped += commit
        return await self._inner.finish(txn_id, False)


async def test_two_phase_commit_applied_on_one_shard_is_flagged(tmp_path: Path) -> None:
    engine = await EmbeddedEngine.open(EngineConfig(data_dir=tmp_path / "data", shards=3))
    try:
        broken = {sid: PrimaryOnlyCommits(s) for sid, s in engine.bus.shards.items()}
        engine.bus.shards.update(broken)  # the coordinator and recovery share this dict
        assert engine.bus.coordinator.shards is engine.bus.shards
        rec, _ = await _list_append_run(AsyncSession(engine.bus, "checker"), BROKEN_TXNS, seed=13)
    finally:
        await engine.close()
    assert sum(s.dropped for s in broken.values()) > 0
    report = check(rec.events)
    _figures("2PC on one shard", report)
    found = report.by_kind()
    assert found.get("fractured-read") and found.get("lost-write"), report.summary()


async def test_two_phase_commit_acknowledged_with_the_primary_versions_only_is_flagged(tmp_path: Path) -> None:
    """The answer of a two-phase commit as it was before YES votes carried versions, when
    every finish reply is lost: only the primary's new versions. The list-append workload
    records what the answer named, so the checker sees the incomplete results."""
    engine = await EmbeddedEngine.open(EngineConfig(data_dir=tmp_path / "data", shards=3))
    coordinator = engine.bus.coordinator
    commit = coordinator.commit
    trimmed = 0

    async def primary_versions_only(req: Any) -> Any:
        nonlocal trimmed
        result = await commit(req)
        if result.two_phase and result.versions:
            primary = coordinator.shard_for(min(result.versions))
            kept = {k: v for k, v in result.versions.items() if coordinator.shard_for(k) == primary}
            trimmed += kept != result.versions
            result.versions = kept
        return result

    try:
        coordinator.commit = primary_versions_only
        rec, _ = await _list_append_run(AsyncSession(engine.bus, "checker"), BROKEN_TXNS, seed=14)
    finally:
        await engine.close()
    assert trimmed > 0
    report = check(rec.events)
    _figures("2PC answered with the primary's versions", report)
    assert report.by_kind() == {"incomplete-result": trimmed}, report.summary()


# ---- acknowledged before fsync, then power loss ------------------------------------------------


def _install_sync_tracker(log_path: str) -> None:
    """Record, at every fsync/fdatasync of a WAL segment, the file's size: what a power loss keeps."""
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def tracking(real: Any) -> Any:
        def sync(fd: int) -> None:
            real(fd)
            try:
                path = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                return
            if path.endswith(".wal"):
                os.write(log_fd, f"{path}\t{os.fstat(fd).st_size}\n".encode())

        return sync

    os.fsync = tracking(os.fsync)
    if hasattr(os, "fdatasync"):
        os.fdatasync = tracking(os.fdatasync)


async def _power_loss_child(data: str, history: str, syncs: str, no_fsync: bool, txns: int) -> None:
    _install_sync_tracker(syncs)
    root = await oribus.open_local(data, shards=POWER_LOSS_SHARDS, agent="checker", unsafe_no_fsync=no_fsync)
    rec = Recorder()
    sessions = [root.session(agent=f"client-{i}") for i in range(CLIENTS)]
    await run_list_append(sessions, rec, txns=txns, seed=21)
    rec.dump(history)  # in the page cache, which a process kill does not take back
    os.kill(os.getpid(), signal.SIGKILL)


async def _power_loss_run(tmp_path: Path, no_fsync: bool) -> Any:
    data, history, syncs = tmp_path / "data", tmp_path / "history.jsonl", tmp_path / "syncs"
    async with oribus.open_local(data, shards=POWER_LOSS_SHARDS):
        pass  # create the data directory durably (layout and first segments, fsynced)
    durable = {str(p.resolve()): p.stat().st_size for p in data.rglob("*.wal")}
    assert durable
    proc = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "power-loss-child", str(data), str(history), str(syncs),
        "1" if no_fsync else "0", str(POWER_LOSS_TXNS),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, err.decode()[-2000:])
    # the power loss: every WAL segment keeps what its last fsync covered
    if syncs.exists():
        for line in syncs.read_text().splitlines():
            path, size = line.split("\t")
            durable[path] = max(durable.get(path, 0), int(size))
    cut = 0
    for p in data.rglob("*.wal"):
        keep = durable.get(str(p.resolve()))
        if keep is None:
            p.unlink()  # created and never fsynced: its directory entry is not durable either
            cut += 1
        elif p.stat().st_size > keep:
            os.truncate(p, keep)
            cut += 1
    events = read_history(history)
    async with oribus.open_local(data, shards=POWER_LOSS_SHARDS, agent="checker") as root:
        final = Recorder()
        await record_final(root, final)
    report = check(events + final.events)
    return report, cut


async def test_power_loss_with_fsync_loses_nothing(tmp_path: Path) -> None:
    """The control run of the power-loss simulation: with fsync on, nothing acknowledged is lost.

    How the power loss is simulated: a child process runs the list-append
    workload on the embedded engine with a wrapper around ``os.fsync`` and
    ``os.fdatasync`` that logs, after each call on a WAL segment, the file's
    size. Once the workload is done the child writes its history and
    SIGKILLs itself. The parent then cuts every segment back to the size its
    last fsync covered (segments are append-only, so that is exactly the data
    a power loss may keep; the kernel could keep more, never less), reopens
    the engine, reads the final state and checks the history against it.
    """
    report, _cut = await _power_loss_run(tmp_path, no_fsync=False)
    _figures("power loss, fsync", report)
    assert report.ok, report.summary()
    assert report.counts["committed"] >= POWER_LOSS_TXNS // 3


async def test_power_loss_after_acknowledging_before_fsync_is_flagged(tmp_path: Path) -> None:
    """``unsafe_no_fsync`` acknowledges commits that only the page cache holds: a power loss loses them.

    Same simulation as the control run above (see its docstring), with
    ``unsafe_no_fsync=True`` in the child: the engine never fsyncs its WAL, so
    the power loss cuts each segment back to its size when the child started,
    and every acknowledged append must be reported lost.
    """
    report, cut = await _power_loss_run(tmp_path, no_fsync=True)
    _figures("power loss, no fsync", report)
    assert cut > 0
    lost = report.of_kind("lost-write")
    assert lost, report.summary()
    # every committed transaction that appended lost its appends
    appenders = {t["id"] for a in lost for t in a.ops}
    assert len(appenders) >= report.counts["committed"] // 2


if __name__ == "__main__" and len(sys.argv) == 7 and sys.argv[1] == "power-loss-child":
    _, _, data_arg, history_arg, syncs_arg, no_fsync_arg, txns_arg = sys.argv
    asyncio.run(_power_loss_child(data_arg, history_arg, syncs_arg, no_fsync_arg == "1", int(txns_arg)))
    time.sleep(10)  # not reached: the child kills itself
