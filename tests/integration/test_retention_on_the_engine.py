"""Retention by age on the embedded engine (specs/engine.md "Retention"), with both history stores.

The engine runs its shards' background compaction as it always does; the
tests move each shard's wall clock (the ``Shard.wall_clock`` seam the
simulator uses) an hour on instead of waiting, then hold ``history``,
``rollback`` and ``watch`` to what the age rule promises: every version older
than the max age gone but the current one, a rollback or a watch that needs one
refused with ``HistoryTruncated`` naming the oldest kept version and the rule
(and changing nothing), younger versions untouched, a watch planned before the
compaction given every version, and a reopen keeping at least what the live
shard kept.
"""

from __future__ import annotations

import asyncio
import time

import pytest

import oribus
from oribus.errors import HistoryTruncated, InvalidRequest

HOUR = 3600.0


async def versions(bus: oribus.AsyncSession, key: str) -> list[int]:
    return [v.version for v in await bus.history(key)]


def move_clocks(bus: oribus.AsyncSession, ahead: float) -> None:
    """Every shard's wall clock (what its compaction reads) ``ahead`` seconds on."""
    for shard in bus._owner.shards.values():
        shard.wall_clock = lambda: time.time() + ahead


async def dropped_by_age(bus: oribus.AsyncSession, at_least: int, timeout: float = 10.0) -> int:
    """Wait until the shards' compaction dropped ``at_least`` versions by age (it runs every 0.1 s)."""
    deadline = time.monotonic() + timeout
    while True:
        stats = await bus.stats()
        dropped = sum(s["history"]["dropped_by_age"] for s in stats["shards"])
        if dropped >= at_least or time.monotonic() > deadline:
            return dropped
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("store", ["memory", "lmdb"])
async def test_history_rollback_and_watch_after_an_age_compaction(tmp_path, store):
    options = {"history_store": store, "history_max_age": "1h", "history_limit": 50}
    async with oribus.open_local(tmp_path, shards=2, agent="w", **options) as bus:
        for i in range(1, 6):
            await bus.put("old/k", i)  # versions 1..5
        await bus.put("old/single", 1)
        watch = bus.watch("old/", from_version=0)  # planned now: promised every version
        first = await asyncio.wait_for(watch.__anext__(), 5)
        assert (first.key, first.version) in {("old/k", 1), ("old/single", 1)}

        move_clocks(bus, 2 * HOUR)
        assert await dropped_by_age(bus, 4) == 4  # old/k's 1..4; no current version
        assert await versions(bus, "old/k") == [5]
        assert await versions(bus, "old/single") == [1]

        # the watch planned before the compaction still gets everything it was promised
        seen = [(first.key, first.version)]
        while len(seen) < 6:
            change = await asyncio.wait_for(watch.__anext__(), 5)
            seen.append((change.key, change.version))
        assert sorted(seen) == [("old/k", v) for v in range(1, 6)] + [("old/single", 1)]
        await watch.aclose()

        # a rollback to a dropped version: a clear error naming the oldest kept and the rule
        with pytest.raises(HistoryTruncated, match=r"version 2 of 'old/k' is no longer in its history "
                                                   r"\(kept: 5\.\.5\): dropped by the age limit") as e:
            await bus.rollback({"old/k": 2})
        assert e.value.details["oldest"] == 5 and e.value.details["rule"] == "age"
        assert isinstance(e.value, InvalidRequest)
        assert (await bus.get("old/k")).version == 5  # nothing written

        # a watch from a dropped version: refused, naming the rule; from the kept one it works
        with pytest.raises(HistoryTruncated, match="age limit") as w:
            async for _ in bus.watch("old/", from_version=0):
                pass
        assert w.value.details["rules"] == {"old/k": "age"}
        watch = bus.watch("old/k", from_version=4)
        assert (await asyncio.wait_for(watch.__anext__(), 5)).version == 5
        await watch.aclose()

        # younger versions stay (their age is measured from their own commit)
        move_clocks(bus, 0.0)
        for i in range(6, 9):
            await bus.put("old/k", i)
        assert await versions(bus, "old/k") == [8, 7, 6, 5]
        assert await bus.rollback({"old/k": 6}) == {"old/k": 9}
        assert (await bus.get("old/k")).value == 6
        kept = await versions(bus, "old/k")
        stats = (await bus.stats())["shards"]
        assert sum(s["history"]["compaction_passes"] for s in stats) > 0

    # Recovery keeps what the live shard kept, or more (the WAL replays what the compaction
    # dropped; the next pass drops it again), never less.
    async with oribus.open_local(tmp_path, agent="w", **options) as bus:
        after = await versions(bus, "old/k")
        assert set(kept) <= set(after) and after == list(range(after[0], after[-1] - 1, -1))
        assert (await bus.get("old/k")).value == 6
        move_clocks(bus, 2 * HOUR)
        await dropped_by_age(bus, len(after) - 1)
        assert await versions(bus, "old/k") == [9]


async def test_bad_retention_is_refused_before_anything_opens(tmp_path):
    for bad in ({"history_limit": 0}, {"history_limit": -3}, {"history_limit": 2.5},
                {"history_max_age": 0}, {"history_max_age": -1.0}, {"history_max_age": "soon"},
                {"history_max_age": "0s"}, {"history_max_age": float("nan")}, {"history_max_age": float("inf")}):
        with pytest.raises(InvalidRequest, match="history"):
            await oribus.open_local(tmp_path / "d", agent="w", **bad)
        assert not (tmp_path / "d").exists(), bad  # nothing was created
