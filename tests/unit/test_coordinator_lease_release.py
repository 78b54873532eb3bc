"""The coordinator ends read leases in batches: the one-writer commits that finish in one turn
of the event loop release their leases with one ``release_leases`` call per shard
(PROTOCOL.md §5.8: a release is only an early end of the lease, so sending it a turn later
changes nothing but the number of calls)."""

from __future__ import annotations

import asyncio
from typing import Any

from oribus.bus.coordinator import Coordinator
from oribus.contract import CommitRequest
from oribus.messages import TxnOutcome, TxnState, Vote, VoteKind
from oribus.shards.service import ShardServiceByCalls
from oribus.types import SessionRef

READER, WRITER = 0, 1
SESSION = SessionRef("agent", "s1")


class ScriptedShard(ShardServiceByCalls):
    """A shard reached by calls that records them: a validation is a YES with a lease, a one-phase
    commit waits until the test lets every commit finish at once."""

    def __init__(self, calls: list[tuple[int, str, Any]], shard_id: int, commits_go: asyncio.Event) -> None:
        self.calls = calls
        self.shard_id = shard_id
        self.commits_go = commits_go

    async def _call(self, op: str, *params: Any) -> Any:
        self.calls.append((self.shard_id, op, params))
        if op == "validate":
            return Vote(VoteKind.YES, lease=2.0)
        if op == "commit_one_phase":
            await self.commits_go.wait()
            return TxnOutcome(TxnState.COMMITTED, versions=dict.fromkeys(params[0].writes, 2))
        if op in ("release_lease", "release_leases"):
            return None
        raise AssertionError(f"unexpected call {op}")

    def watch(self, request: Any) -> Any:
        raise NotImplementedError


def one_writer_request(i: int) -> CommitRequest:
    # reads "r<i>" on the reader shard, writes "w<i>" on the writer shard
    return CommitRequest(SESSION, f"c{i}", writes={f"w{i}": b"\x01"}, read_set={f"r{i}": 1},
                         tokens={READER: (1, 1), WRITER: (1, 1)})


async def test_the_leases_of_commits_finishing_together_are_released_in_one_call_per_shard():
    calls: list[tuple[int, str, Any]] = []
    go = asyncio.Event()
    shards = {s: ScriptedShard(calls, s, go) for s in (READER, WRITER)}
    coordinator = Coordinator(shards, lambda key: READER if key.startswith("r") else WRITER)
    commits = [asyncio.create_task(coordinator.commit(one_writer_request(i))) for i in range(5)]
    while sum(op == "commit_one_phase" for _, op, _ in calls) < 5:
        await asyncio.sleep(0)
    go.set()  # every commit finishes in the same turn
    results = await asyncio.gather(*commits)
    assert [r.versions for r in results] == [{f"w{i}": 2} for i in range(5)]
    for _ in range(3):  # the release leaves in a background task
        await asyncio.sleep(0)
    releases = [(s, op, params) for s, op, params in calls if op.startswith("release")]
    assert releases == [(READER, "release_leases", ([f"c{i}" for i in range(5)],))]


async def test_a_lease_granted_in_a_later_turn_is_released_by_a_call_of_its_own():
    calls: list[tuple[int, str, Any]] = []
    go = asyncio.Event()
    go.set()
    shards = {s: ScriptedShard(calls, s, go) for s in (READER, WRITER)}
    coordinator = Coordinator(shards, lambda key: READER if key.startswith("r") else WRITER)
    for i in range(2):
        await coordinator.commit(one_writer_request(i))
        for _ in range(3):
            await asyncio.sleep(0)
    releases = [(s, op, params) for s, op, params in calls if op.startswith("release")]
    assert releases == [(READER, "release_leases", (["c0"],)), (READER, "release_leases", (["c1"],))]


async def test_a_sessions_commits_one_after_the_other_are_not_refused_by_its_own_leases(tmp_path):
    # Two in-process shards: each put of the writer is a one-writer commit whose read-only
    # participant is the other shard (the session's token there), where it leaves a lease that
    # the next put, writing there, meets at its writer unless the release went first.
    import oribus
    from oribus.meta.slots import StaticSlotMap

    slots = StaticSlotMap(2)
    on = {0: [], 1: []}
    i = 0
    while len(on[0]) < 3 or len(on[1]) < 3:
        on[slots.shard_for(f"k{i}")].append(f"k{i}")
        i += 1
    async with oribus.open_local(tmp_path, shards=2, agent="writer") as bus:
        s = bus.session(agent="writer")
        await s.get_many([on[0][0], on[1][0]])  # a token on both shards
        for n in range(40):
            await s.put(on[n % 2][n % 3], n)  # never Conflict: nobody else writes
        assert bus._bus.coordinator.counters["conflicts"] == 0
