"""Replica groups whose members keep history on disk, in the deterministic simulation.

With ``SimConfig(replicas=3, history_store="lmdb")`` every member of a group keeps its older
versions in the ``SimHistory`` of its own simulated disk (``oribus/sim/history.py``,
``oribus/sim/group.py``): its follower core applies into it, the Shard it serves as primary
reads and writes it, a crash of the member takes what was not synced, a lost disk takes all
of it. A learner that catches up from a snapshot receives, in the same catch-up frame, the
primary's consistent copy of its engine (``SimHistory.copy_file`` framed by the real
``CatchupSource``), in ``SnapshotChunk``s of ``snapshot_chunk_bytes`` over the simulated
network, and installs it in place of its whole engine. The final read takes every key's whole
history from the final primary; the checker and the lost-acknowledged-commit check compare
it with what was acknowledged (``specs/replication.md`` R-1, R-2).

1. ``SimHistory``'s copy, its encoding, its install and the fencing of a dead member's engine.
2. Seeds of replica groups on the simulated engine, under the soak's random faults and a
   schedule that crashes members, destroys a disk and so forces a catch-up from a snapshot:
   no anomaly, no acknowledged commit lost, and the catch-ups carried the engine.
3. A catch-up cut mid-transfer (messages lost) starts over and ends installed.
4. The model bites: a catch-up that ships an empty engine
   (``DiskConfig.unsafe_history_empty_catchup_copy``) and an engine whose sync does nothing
   (``unsafe_history_sync_does_nothing``) lose acknowledged history within a few seeds, and
   the same runs are clean with the honest engine.
5. ``python -m oribus.sim --replicas 3 --history-store lmdb`` runs and reports the catch-ups.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from oribus.errors import DataCorrupted
from oribus.sim import Fault, SimConfig, SimResult, random_faults, simulate
from oribus.sim.disk import DiskConfig
from oribus.sim.history import SimHistory

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
META = ("agent", "s1", "c1", 1.5)


def _config(**overrides: object) -> SimConfig:
    base: dict[str, object] = dict(replicas=3, shards=1, duration=1.5, list_clients=4, register_clients=2,
                                   snapshot_every_records=20, history_store="lmdb")
    return SimConfig(**{**base, **overrides})  # type: ignore[arg-type]


def _explain(result: SimResult) -> str:
    lines = [result.summary(), "faults: " + "; ".join(f.describe() for f in result.faults)]
    lines += [f"{a.kind}: {a.message}" for a in result.report.anomalies[:3]]
    lines += result.lost_acknowledged[:3] + result.internal_errors[:3]
    c = result.counters
    lines.append(f"engine installs {c['engine_installs']}, catch-up chunks {c['snapshot_chunks']}, "
                 f"cut {c['catchups_cut']}, engine records lost by crashes {c['history_versions_lost']}")
    return "\n".join(lines)


# ---- 1. the simulated engine's catch-up --------------------------------------------------------


def test_a_copy_holds_the_written_state_and_an_install_replaces_the_whole_engine() -> None:
    primary = SimHistory()
    primary.put("k", (1, b"a", META))
    primary.flush()
    primary.sync()  # durable
    primary.put("k", (2, b"b", META))
    primary.flush()  # written, not synced: a read transaction sees it, so the copy holds it
    primary.put("k", (3, b"c", META))  # buffered: not in the copy (the WAL replays it)
    copy = primary.copy()
    assert sorted(copy._state["k"]) == [1, 2]
    assert SimHistory.decode(copy.encode())._state == copy._state
    with primary.copy_file() as f:
        f.seek(0)
        assert SimHistory.decode(f.read())._state == copy._state

    learner = SimHistory()
    learner.put("other", (7, b"x", META))
    learner.flush()
    learner.sync()
    learner.put("other", (8, b"y", META))  # buffered when the catch-up lands
    learner.install(copy)
    assert list(learner.newest_first("k", 10, 1)) == [(2, b"b", META), (1, b"a", META)]
    assert learner.oldest("other", 1) is None  # the whole engine replaced, buffered writes too
    assert learner.crash() == 0  # the install is durable at once
    assert sorted(learner._state["k"]) == [1, 2]


def test_a_crashed_members_engine_keeps_what_was_synced_and_not_what_the_dead_process_does() -> None:
    engine = SimHistory()
    engine.put("k", (1, b"a", META))
    engine.flush()
    engine.sync()
    engine.put("k", (2, b"b", META))
    engine.flush()
    assert engine.crash() == 1
    reopened = engine.reopened()
    engine.put("k", (3, b"c", META))  # a task of the dead process, cancelled but still running
    engine.flush()
    engine.sync()
    engine.install(None)
    assert sorted(reopened._state["k"]) == [1]
    assert reopened.lost_versions == 1


def test_a_damaged_engine_copy_is_refused() -> None:
    with pytest.raises(DataCorrupted):
        SimHistory.decode(b"\x93not a history")


def test_an_unsafe_empty_copy_ships_nothing() -> None:
    engine = SimHistory(unsafe_empty_catchup_copy=True)
    engine.put("k", (1, b"a", META))
    engine.flush()
    assert engine.copy()._state == {}


# ---- 2. seeds of replica groups on the simulated engine ----------------------------------------

# a follower's disk lost in each group once snapshots let the log below them go (its catch-up
# needs the snapshot, and the engine with it), then each primary killed
FORCED = [Fault(0.5, "disk_loss", 0, 0.2, 1.0), Fault(0.6, "disk_loss", 1, 0.2, 2.0),
          Fault(1.0, "kill_primary", 0, 0.3, 0.0), Fault(1.1, "kill_primary", 1, 0.3, 0.0)]


def test_replica_groups_on_the_simulated_engine_find_no_anomaly(capsys: pytest.CaptureFixture[str]) -> None:
    totals = {"runs": 0, "transactions": 0, "committed_checked": 0, "faults": 0, "member_crashes": 0,
              "disk_losses": 0, "engine_installs": 0, "snapshot_chunks": 0, "catchups_cut": 0,
              "history_versions_lost": 0, "lost_acknowledged": 0, "anomalies": 0}
    for seed in range(10):
        config = _config(shards=2, snapshot_every_records=random.Random(seed).choice((10, 20, 40)))
        schedule = FORCED + random_faults(random.Random(f"lmdb-groups/{seed}"), config, 5)
        result = simulate(seed, config, schedule)
        totals["runs"] += 1
        totals["lost_acknowledged"] += len(result.lost_acknowledged)
        totals["anomalies"] += len(result.report.anomalies)
        for k in totals:
            if k not in ("runs", "lost_acknowledged", "anomalies"):
                totals[k] += result.counters[k]
        assert result.ok, _explain(result)
        assert result.counters["disk_losses"] >= 1 and result.counters["member_crashes"] >= 2, _explain(result)
        assert result.counters["engine_emptied"] == 0, _explain(result)  # every snapshot carried the engine
    with capsys.disabled():
        print(f"\nreplica groups on the simulated engine: {totals}")
    assert totals["engine_installs"] >= totals["runs"]  # every run caught a learner up with the engine
    assert totals["snapshot_chunks"] > totals["engine_installs"]  # in several messages each
    assert totals["history_versions_lost"] > 0  # crashes took unsynced engine records: replay restored them
    assert totals["anomalies"] == 0 and totals["lost_acknowledged"] == 0


def test_same_seed_same_run_with_history_on_the_members_disks() -> None:
    first = simulate(3, _config(), FORCED)
    again = simulate(3, _config(), FORCED)
    assert first.counters["engine_installs"] >= 1
    assert first.trace == again.trace and first.history == again.history
    assert first.ok, _explain(first)


def test_a_learner_caught_up_while_the_primarys_term_starts_receives_the_engine() -> None:
    """Member 1 loses its disk and the primary is killed: no majority is left to elect until
    the primary is back, and the learner then asks the new primary for a snapshot while its
    term is starting (TERM_START not yet committed, no Shard open). The snapshot was sent
    without the engine then (``_snapshot_source`` looked only at the Shard), so the learner
    emptied its own; elected after the next kill, it answered histories without every
    version older than the snapshot: 19 acknowledged writes missing from the final history.
    Now the member's own engine travels with the snapshot."""
    config = _config(duration=2.5, snapshot_every_records=10)
    schedule = [Fault(0.3, "disk_loss", 0, 0.2, 2.0), Fault(0.35, "kill_primary", 0, 0.6, 0.0),
                Fault(1.1, "kill_primary", 0, 1.2, 0.0)]
    result = simulate(1, config, schedule)
    elected = [ev[2] for ev in result.trace if ev[1] == "primary"]
    assert elected[-1] == "shard-0.1", elected  # the member that caught up serves at the end
    assert result.counters["engine_emptied"] == 0, _explain(result)
    assert result.counters["engine_installs"] >= 1, _explain(result)
    assert result.ok, _explain(result)


# ---- 3. a catch-up cut mid-transfer ------------------------------------------------------------


def test_a_catchup_cut_mid_transfer_starts_over_and_installs_the_engine() -> None:
    """A follower's disk is lost, and while it catches up 30% of all messages are lost: some
    chunk of the frame (snapshot + engine) goes missing, the learner refuses the next, and the
    primary starts the transfer over until one arrives whole."""
    for seed in range(10):
        schedule = [Fault(0.2, "disk_loss", 0, 0.2, 1.0), Fault(0.4, "loss", 0, 0.6, 0.3)]
        result = simulate(seed, _config(snapshot_chunk_bytes=1024), schedule)
        assert result.ok, _explain(result)
        if result.counters["catchups_cut"]:
            break
    else:
        raise AssertionError("no catch-up was cut within 10 seeds")
    assert result.counters["engine_installs"] >= 1, _explain(result)
    assert any(ev[1] == "voter-again" for ev in result.trace), "the learner never became a voter again"


# ---- 4. the model bites ------------------------------------------------------------------------

CATCH_WITHIN = 10  # seeds


def _first_caught(disk: DiskConfig, schedule_of: Callable[[int], list[Fault]]) -> tuple[int, SimResult]:
    for seed in range(CATCH_WITHIN):
        result = simulate(seed, _config(disk=disk), schedule_of(seed))
        if not result.ok:
            return seed, result
    raise AssertionError(f"{disk}: no seed of {CATCH_WITHIN} was caught")


def _learner_then_failovers(seed: int) -> list[Fault]:
    """A follower loses its disk and catches up from a snapshot; then the primary is killed,
    twice: the learner, a voter again, may be elected (ties go to the lowest id)."""
    rng = random.Random(f"learner-failovers/{seed}")
    return [Fault(0.2, "disk_loss", 0, 0.2, rng.choice((1.0, 2.0))),
            Fault(rng.uniform(0.6, 0.8), "kill_primary", 0, 0.3, 0.0),
            Fault(rng.uniform(1.0, 1.2), "kill_primary", 0, 0.3, 0.0)]


def _failovers(seed: int) -> list[Fault]:
    """The primary killed three times, after snapshots let the log below them go."""
    rng = random.Random(f"failovers/{seed}")
    return [Fault(rng.uniform(0.2, 0.4), "kill_primary", 0, 0.2, 0.0),
            Fault(rng.uniform(0.7, 0.9), "kill_primary", 0, 0.2, 0.0),
            Fault(rng.uniform(1.1, 1.3), "kill_primary", 0, 0.2, 0.0)]


def _lost_history(result: SimResult) -> list[str]:
    return [lost for lost in result.lost_acknowledged if "not in the final history" in lost]


@pytest.mark.parametrize("broken, schedule_of", [
    (DiskConfig(unsafe_history_empty_catchup_copy=True), _learner_then_failovers),
    (DiskConfig(unsafe_history_sync_does_nothing=True), _failovers),
], ids=["empty-catchup-copy", "sync-does-nothing"])
def test_catches_a_broken_engine_in_replica_groups(broken: DiskConfig, schedule_of: Callable[[int], list[Fault]],
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    seed, caught = _first_caught(broken, schedule_of)
    with capsys.disabled():
        print(f"\n{broken}: caught at seed {seed}: {len(caught.lost_acknowledged)} acknowledged writes lost "
              f"from the final primary's history, {caught.counters['engine_installs']} engine installs")
    assert _lost_history(caught), _explain(caught)  # acknowledged versions gone from the history
    honest = simulate(seed, _config(), schedule_of(seed))
    assert honest.ok, _explain(honest)


# ---- 5. the soak -------------------------------------------------------------------------------


def test_soak_entry_point_runs_replica_groups_with_history_on_disk() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "oribus.sim", "--seeds", "1", "--first-seed", "2", "--duration", "1",
         "--faults", "6", "--replicas", "3", "--history-store", "lmdb", "-v"],
        cwd=REPO, env={**os.environ, "PYTHONHASHSEED": "0"}, capture_output=True, text=True, timeout=180,
    )
    assert out.returncode == 0, out.stdout + out.stderr[-2000:]
    assert "oribus.sim: 1 runs" in out.stdout and "0 failing seeds" in out.stdout
    assert "0 acknowledged commits lost" in out.stdout
    assert "history on the members' disks (lmdb)" in out.stdout, out.stdout
