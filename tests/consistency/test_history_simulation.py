"""The deterministic simulation with history on disk (``history_store="lmdb"``, oribus/sim/history.py).

Each simulated shard keeps its older versions in the ``SimHistory`` of its
disk, which loses everything not synced when the shard crashes — the worst a
power cut does to LMDB committed without fsync. Snapshots come often, so they
let the WAL below them go while crashes land all around: the checker's
durability and version-order checks then hold the shard to its rule that the
engine is synced before a snapshot is written. The broken engine (a sync that
does nothing) shows the checks can fail.
"""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, given, settings

from oribus.sim.config import SimConfig
from oribus.sim.disk import DiskConfig
from oribus.sim.faults import Fault
from oribus.sim.harness import SimResult, simulate

pytestmark = pytest.mark.slow

millis = st.integers(0, 1400).map(lambda ms: ms / 1000)
crashes = st.builds(Fault, at=millis, kind=st.just("crash"), target=st.integers(0, 2),
                    duration=st.integers(0, 300).map(lambda ms: ms / 1000), amount=st.sampled_from([0.0, 1.0, 3.0]))
configs = st.builds(
    SimConfig,
    shards=st.integers(1, 3),
    list_clients=st.integers(1, 4),
    register_clients=st.integers(1, 2),
    rollback_rate=st.sampled_from([0.25, 0.5]),
    snapshot_every_records=st.sampled_from([5, 10, 40]),
    history_store=st.just("lmdb"),
    duration=st.just(1.5),
)

# A schedule of crashes every few hundred milliseconds, after snapshots have let WAL segments go.
SCHEDULE = [Fault(0.4, "crash", 0, 0.1, 0.0), Fault(0.7, "crash", 1, 0.1, 0.0), Fault(1.0, "crash", 0, 0.1, 0.0)]


def _explain(result: SimResult) -> str:
    lines = [result.summary(), "faults: " + "; ".join(f.describe() for f in result.faults)]
    lines += [f"{a.kind}: {a.message}" for a in result.report.anomalies[:3]]
    lines += result.lost_acknowledged[:3] + result.internal_errors[:3]
    return "\n".join(lines)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), config=configs, schedule=st.lists(crashes, min_size=1, max_size=5))
def test_history_on_disk_survives_crashes_between_snapshots(seed: int, config: SimConfig,
                                                            schedule: list[Fault]) -> None:
    result = simulate(seed, config, schedule)
    assert result.ok, _explain(result)


def test_catches_an_engine_whose_sync_does_nothing() -> None:
    config = SimConfig(shards=2, duration=1.5, snapshot_every_records=10, history_store="lmdb",
                       disk=DiskConfig(unsafe_history_sync_does_nothing=True))
    broken = simulate(0, config, SCHEDULE)
    assert not broken.ok
    assert broken.lost_acknowledged, _explain(broken)  # acknowledged versions gone from the history
    config.disk = DiskConfig()
    honest = simulate(0, config, SCHEDULE)
    assert honest.ok, _explain(honest)


@pytest.mark.parametrize("store", ["memory", "lmdb"])
def test_the_age_rule_runs_on_virtual_clocks_deterministically_through_crashes(store: str) -> None:
    """Each simulated shard runs the age rule's compaction on its own (skewed) virtual wall clock
    (specs/engine.md "Retention"): versions are dropped, crashes land among the compactions, the
    checker finds nothing (versions below a key's oldest kept one are not counted as lost), and the
    same seed gives the same run."""
    config = SimConfig(shards=2, duration=1.5, snapshot_every_records=10, history_store=store,
                       history_max_age=0.3)
    first = simulate(3, config, SCHEDULE)
    assert first.ok, _explain(first)
    assert first.counters["history_dropped_by_age"] > 0, first.counters
    again = simulate(3, config, SCHEDULE)
    assert again.trace_hash == first.trace_hash
    # without the age rule nothing is dropped by age (and the run is another one)
    kept = simulate(3, SimConfig(shards=2, duration=1.5, snapshot_every_records=10, history_store=store), SCHEDULE)
    assert kept.ok and kept.counters["history_dropped_by_age"] == 0
