"""Replicated shards over real processes and a real etcd (``specs/replication.md``).

A group of three ``oribus shard`` members of shard 0 and a bus: the members elect one primary
through etcd and commits flow through the bus. Then the faults the design is for:

* kill -9 of the primary: a follower takes over (a new term, which the bus follows as a new
  epoch), writes flow again, and every commit acknowledged before is there;
* the killed member restarted with its data directory deleted: it rejoins as a learner,
  catches up from the primary and becomes a voter — proven by killing the primary again,
  which leaves it and one other member to elect a primary that still holds everything;
* SIGSTOP of the primary past its lease: a new primary; the old one, resumed, answers
  nothing (its primary lease ran out: reads too, which no follower could refuse);
* kill -9 of a follower never blocks commits; a session that read from the old primary gets
  ``SessionExpired`` after a failover (fail closed);
* an SDK fleet in ``run()`` through a failover: no lost and no duplicated increment;
* a member that opens after the group's first term: a learner, a voter once shipped
  everything with no traffic to carry it, and then the group can lose its primary.

Every group here starts with all three members voters (``ReplicaGroup.start`` waits for that,
as ``oribus up`` does): killing the primary while one member is still a learner would leave one
voter, no majority, and the group rightly without a primary.
"""

from __future__ import annotations

import asyncio
import shutil
import time
import uuid

import pytest
from processes import run_cli
from replica_group import LEASE_TTL, ReplicaGroup

import oribus
from oribus import SessionExpired, Unavailable
from oribus.rpc.shard_client import StreamShardClient

pytestmark = pytest.mark.timeout(180)


async def commit_retrying(session: oribus.Session, writes: dict, timeout: float = 30.0) -> dict:
    """Commit through a failover: resent with the same commit id while the outcome is unknown
    (``Unavailable``); after ``SessionExpired`` (the session's deliveries, its own writes too,
    lived on the old primary: the commit was refused) the session is reset and a new commit made."""
    deadline = time.monotonic() + timeout
    commit_id = uuid.uuid4().hex
    while True:
        try:
            return await session.commit(writes, commit_id=commit_id)
        except Unavailable:
            pass
        except SessionExpired:
            await session.reset_session()
            commit_id = uuid.uuid4().hex
        assert time.monotonic() < deadline, "writes did not flow again"
        await asyncio.sleep(0.1)


async def first_stats(group: ReplicaGroup, member: int, term: int, timeout: float = 30.0) -> dict:
    """The shard's stats from ``member``, the primary of ``term``, as soon as it serves them."""
    stream = group.members[member].stream_address
    assert stream is not None
    client = StreamShardClient(0, stream, epoch=term, timeout=2.0)
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                return await client.stats()
            except Unavailable:
                assert time.monotonic() < deadline, f"member {member} never served term {term}"
                await asyncio.sleep(0.01)
    finally:
        await client.close()


async def test_a_killed_primary_is_replaced_and_a_member_that_lost_its_disk_catches_up(cluster, tmp_path, etcd):
    group = await ReplicaGroup(cluster, tmp_path, etcd.url).start()
    assert group.bus is not None
    first = await group.wait_primary()
    # a brand-new group's first primary waits no restart grace: no primary before it could
    # have granted a read lease
    assert (await first_stats(group, first.member, first.term))["restart_grace_left"] == 0
    acked: dict[str, int] = {}
    async with oribus.connect(group.bus.address, agent="writer") as w:
        for i in range(30):
            acked.update(await w.commit({f"k/{i}": i}))

        group.members[first.member].kill9()
        killed_at = time.monotonic()
        while (second := await group.primary()) is None or second.member == first.member:
            assert time.monotonic() < killed_at + 30, f"no new primary within 30s:\n{cluster.logs()}"
            await asyncio.sleep(0.02)
        # ... every later one does (the dead primary's read leases may still be out)
        assert (await first_stats(group, second.member, second.term))["restart_grace_left"] > 0
        await commit_retrying(w, {"after/1": 1})
        back_in = time.monotonic() - killed_at
        second = await group.wait_primary(other_than=first.member)
        assert second.term > first.term
        for i in range(30, 40):
            acked.update(await w.commit({f"k/{i}": i}))

        # the killed member comes back with an empty disk: a learner, then a complete voter
        group.restart(first.member, lose_data=True)
        await asyncio.to_thread(group.members[first.member].wait_serving)
        deadline = time.monotonic() + 30
        while True:
            back = await group.status(first.member)
            lead = await group.status(second.member)
            if back is not None and lead is not None and back.voter and back.last >= (second.term, lead.commit_lsn):
                break
            assert time.monotonic() < deadline, f"member {first.member} did not catch up: {back} vs {lead}"
            await asyncio.sleep(0.2)
        for i in range(40, 50):
            acked.update(await w.commit({f"k/{i}": i}))

        # kill the second primary too: the re-filled member and the third elect one that has everything
        group.members[second.member].kill9()
        await commit_retrying(w, {"after/2": 2})
        third = await group.wait_primary(other_than=second.member)
        assert third.term > second.term

    check = oribus.connect(group.bus.address, agent="checker")
    try:
        got = await check.get_many(sorted(acked))
        assert {k: item.version for k, item in got.items()} == acked
        assert {k: item.value for k, item in got.items()} == {f"k/{i}": i for i in range(50)}
    finally:
        await check.close()
    print(f"\nprimary killed -9: writes flowed again after {back_in:.2f}s (lease TTL {LEASE_TTL}s)")


async def test_a_group_that_lost_two_of_its_three_disks_elects_nobody_and_says_why(cluster, tmp_path, etcd):
    """The primary and a follower killed -9 with their data directories deleted: both come back
    as learners and the one voter left is no majority. The group stays without a primary (a
    learner is never elected: fail closed) and the voter says so in its log, naming the learners.
    (A member that opens after the group's first term began is such a learner until it has
    caught up: killing the primary with its disk before then leaves a group of three in this
    state.)"""
    group = await ReplicaGroup(cluster, tmp_path, etcd.url).start()
    assert group.bus is not None
    first = await group.wait_primary()
    async with oribus.connect(group.bus.address, agent="writer") as w:
        await w.commit({"k/0": 0})
    survivor = next(m for m in range(3) if m != first.member)
    lost = [m for m in range(3) if m != survivor]
    for m in lost:  # both before the primary's lease runs out: no election in between
        group.members[m].kill9()
    for m in lost:
        shutil.rmtree(group.data_dir(m))
        group.members[m].start()
    for m in lost:
        await asyncio.to_thread(group.members[m].wait_serving)
    said = f"1 of the group's 3 members answer as voters (a majority is 2; learners: {lost[0]}, {lost[1]};"
    deadline = time.monotonic() + 30
    while said not in (survivor_log := group.members[survivor].log_tail(400)):
        assert time.monotonic() < deadline, survivor_log
        await asyncio.sleep(0.2)
    assert await group.primary() is None
    statuses = {m: await group.status(m) for m in range(3)}
    assert all(s is not None and s.voter == (m == survivor) and s.primary == -1 for m, s in statuses.items()), statuses


async def test_a_primary_paused_past_its_lease_is_replaced_and_answers_nothing_when_resumed(cluster, tmp_path, etcd):
    group = await ReplicaGroup(cluster, tmp_path, etcd.url).start()
    assert group.bus is not None
    old = await group.wait_primary()
    paused = group.members[old.member]
    async with oribus.connect(group.bus.address, agent="writer") as w:
        await w.commit({"p/0": 0})
        paused.pause()
        try:
            new = await group.wait_primary(other_than=old.member)
            assert new.term > old.term
            await commit_retrying(w, {"p/1": 1})
        finally:
            paused.resume()
        # resumed: it still thinks it leads for a moment, but its primary lease ran out while it
        # slept, so it serves nothing — not even a read, which no follower would have refused
        assert paused.stream_address is not None
        direct = StreamShardClient(0, paused.stream_address, epoch=old.term, timeout=5.0)
        try:
            with pytest.raises(Unavailable):
                await direct.stats()
            with pytest.raises(Unavailable):
                await direct.history("p/0")
        finally:
            await direct.close()
        # it steps down and follows the new primary; writes go on
        deadline = time.monotonic() + 20
        while (s := await group.status(old.member)) is None or s.role != "follower":
            assert time.monotonic() < deadline, f"the resumed old primary did not step down: {s}"
            await asyncio.sleep(0.1)
        assert (await group.primary()) == new
        await w.commit({"p/2": 2})
        got = await w.get_many(["p/0", "p/1", "p/2"])
        assert [got[k].value for k in ("p/0", "p/1", "p/2")] == [0, 1, 2]
    assert "primary lease ran out" in paused.log_tail(200)


async def test_a_dead_follower_blocks_nothing_and_old_sessions_fail_closed(cluster, tmp_path, etcd):
    group = await ReplicaGroup(cluster, tmp_path, etcd.url).start()
    assert group.bus is not None
    primary = await group.wait_primary()
    follower = next(m for m in range(3) if m != primary.member)
    async with oribus.connect(group.bus.address, agent="writer") as w, \
            oribus.connect(group.bus.address, agent="reader") as reader:
        await w.commit({"s/a": 1, "s/b": 1})
        await reader.get_many(["s/a", "s/b"])  # deliveries on the primary
        group.members[follower].kill9()
        for i in range(20):  # the primary and the other follower are a majority: no wait, no error
            await w.commit({f"f/{i}": i})
        group.members[follower].start()
        await asyncio.to_thread(group.members[follower].wait_serving)

        group.members[primary.member].kill9()
        await commit_retrying(w, {"s/c": 1})
        # the reader's deliveries lived on the dead primary: its next commit fails closed
        with pytest.raises(SessionExpired):
            await reader.commit({"s/a": 2})
        await reader.reset_session()
        await reader.get("s/a")
        await reader.commit({"s/a": 2})


async def test_a_fleet_in_run_carries_through_a_failover_without_loss_or_duplicate(cluster, tmp_path, etcd):
    group = await ReplicaGroup(cluster, tmp_path, etcd.url).start()
    assert group.bus is not None
    primary = await group.wait_primary()
    counters = [f"n/{i}" for i in range(4)]
    done = {k: 0 for k in counters}
    stop = asyncio.Event()

    async def agent(name: str) -> None:
        async with oribus.connect(group.bus.address, agent=name) as s:
            policy = oribus.RetryPolicy(retries=60, max_delay=0.25)  # a failover lasts seconds
            i = 0
            while not stop.is_set():
                key = counters[i % len(counters)]
                i += 1

                async def bump(tx, key=key):
                    value = (await tx.get(key)).value or 0
                    tx.put(key, value + 1)

                try:
                    await s.run(bump, policy=policy)
                except SessionExpired:  # its deliveries lived on the old primary
                    await s.reset_session()
                    continue
                done[key] += 1

    agents = [asyncio.create_task(agent(f"a{i}")) for i in range(4)]
    try:
        await asyncio.sleep(2)
        group.members[primary.member].kill9()
        await group.wait_primary(other_than=primary.member)
        await asyncio.sleep(3)
    finally:
        stop.set()
        await asyncio.gather(*agents)
    async with oribus.connect(group.bus.address, agent="checker") as check:
        got = await check.get_many(counters)
        assert {k: got[k].value or 0 for k in counters} == done
    assert sum(done.values()) > 0


async def test_a_member_that_opens_after_the_first_term_becomes_a_voter_without_traffic(cluster, tmp_path, etcd):
    """Two members form the group's first term before the third opens: the third is a learner
    (it may have missed acknowledged commits) until the primary has shipped it everything, which
    happens with no commit to carry it. Then the group can lose its primary: the late member
    and the other follower elect a new one."""
    group = ReplicaGroup(cluster, tmp_path, etcd.url)
    r = run_cli("cluster", "init", "--etcd", etcd.url, "--shards", "1", "--replicas", "3")
    assert r.returncode == 0, r.stderr
    for m in (0, 1):
        group.members[m].start()
    for m in (0, 1):
        await asyncio.to_thread(group.members[m].wait_serving)
    first = await group.wait_primary()
    late = group.members[2]
    late.start()
    await asyncio.to_thread(late.wait_serving)
    opened = time.monotonic()
    await group.wait_voters(timeout=15)
    became_voter = time.monotonic() - opened
    group.members[first.member].kill9()
    second = await group.wait_primary(other_than=first.member)
    assert second.term > first.term
    print(f"\nthe late member was a voter {became_voter:.2f}s after it opened")
