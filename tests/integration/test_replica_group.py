"""A replica group of three members over DirectPeers, in temp directories with real fsync
(specs/replication.md): commits acknowledged only on a majority, failover to the most complete
member with every acknowledged commit, a deposed primary that can no longer acknowledge, a
divergent tail cut, a member that lost its disk rejoining as a learner, two-phase records
replicated. Elections are driven as the cluster layer drives them through etcd: ``Etcd`` here
is the term register (a counter moved by compare-and-set) and nothing else."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import shutil
import time
from pathlib import Path

import msgpack
import pytest

from oribus.bus.coordinator import Coordinator
from oribus.contract import CommitRequest
from oribus.errors import InvalidRequest, Unavailable
from oribus.messages import ReadRequest, ShardTxn, TxnState, Vote, VoteKind
from oribus.shards.config import ShardConfig
from oribus.shards.history.lmdb_engine import LmdbHistory
from oribus.shards.replica import DirectNetwork, ReplicaMember, ReplicationOptions
from oribus.shards.replica.catchup import CatchupReceiver, CatchupSource, pack_catchup
from oribus.shards.replica.messages import SnapshotChunk
from oribus.shards.service import ShardServiceByCalls
from oribus.shards.shard import Shard
from oribus.shards.txn import RecordType
from oribus.shards.wal import WalConfig, list_segments, scan_log
from oribus.shards.wal.snapshot import latest_snapshot_file, write_snapshot
from oribus.types import SessionRef

FAST = ReplicationOptions(heartbeat_seconds=0.02, retry_min_seconds=0.005, retry_max_seconds=0.05)
SESSION = SessionRef("agent", "s")
READER = SessionRef("check", "r")


class Etcd:
    """The group's term register: each election moves it by compare-and-set."""

    def __init__(self) -> None:
        self.term = 0

    def next_term(self) -> int:
        seen = self.term
        assert self.term == seen  # the CAS: nobody moved it in between (one election at a time here)
        self.term = seen + 1
        return self.term


class Group:
    def __init__(self, root: Path, replicas: int = 3, options: ReplicationOptions = FAST, **config) -> None:
        self.root = root
        self.options = options
        self.replicas = replicas
        self.config = {"read_lease_seconds": 0.05, "clock_skew_seconds": 0.0, **config}
        self.net = DirectNetwork()
        self.etcd = Etcd()
        self.members: dict[int, ReplicaMember] = {}
        self.deposed: list[tuple[int, int]] = []

    def data_dir(self, i: int) -> Path:
        return self.root / f"member-{i}"

    async def start(self, i: int) -> ReplicaMember:
        cfg = ShardConfig(shard_id=0, data_dir=self.data_dir(i), **self.config)
        m = await ReplicaMember.open(self.data_dir(i), 0, i, self.replicas, config=cfg,
                                     term_register=self.etcd.term, options=self.options)
        m.on_deposed = lambda term, i=i: self.deposed.append((i, term))
        self.members[i] = m
        self.net.add(m)
        return m

    async def start_all(self) -> None:
        for i in range(self.replicas):
            await self.start(i)

    async def crash(self, i: int) -> None:
        """The member's process stops: unreachable, its files as they are."""
        self.net.remove(i)
        m = self.members.pop(i)
        await m.close()

    async def elect(self, candidate: int, timeout: float = 10.0) -> tuple[int, Shard]:
        """An election as §5 runs it: a new term, promises from a majority of the voters, the
        member with the highest last position takes over (ties: the lowest id)."""
        term = self.etcd.next_term()
        granted = {}
        for i in sorted(self.members):
            try:
                if i == candidate:
                    reply = await self.members[i].promise(term, candidate)
                else:
                    reply = await self.net.peers(candidate, [i])[0].promise(term, candidate)
            except Unavailable:
                continue
            if reply.granted:
                granted[i] = reply.last
        assert len(granted) > self.replicas // 2, f"no majority of promises for term {term}: {granted}"
        winner = max(granted, key=lambda i: (granted[i], -i))
        shard = await asyncio.wait_for(self.members[winner].become_primary(term, self.peers(winner)), timeout)
        return winner, shard

    def peers(self, me: int) -> list:
        return self.net.peers(me, list(range(self.replicas)))  # down ones too: they come back

    async def close(self) -> None:
        for i in list(self.members):
            await self.crash(i)


@pytest.fixture
async def group(tmp_path):
    g = Group(tmp_path)
    await g.start_all()
    yield g
    await g.close()


def put(txn_id: str, key: str, value: object) -> ShardTxn:
    return ShardTxn(txn_id=txn_id, session=SESSION, writes={key: msgpack.packb(value)})


async def commit(shard: Shard, txn: ShardTxn, timeout: float = 10.0):
    """Commit, retrying Unavailable (the restart grace of a new primary) until ``timeout``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            return await asyncio.wait_for(shard.commit_one_phase(txn), deadline - loop.time())
        except Unavailable:
            if loop.time() > deadline:
                raise
            await asyncio.sleep(0.02)


async def values(shard: Shard, keys: list[str]) -> dict[str, object]:
    reply = await shard.read(ReadRequest(READER, keys, record=False))
    return {i.key: msgpack.unpackb(i.value) for i in reply.items if i.value is not None}


def log_records(data_dir: Path) -> list[tuple[int, int, object]]:
    """Every record a (closed) member's log holds, from its first segment on; changes nothing."""
    got: list = []
    result = scan_log(list_segments(data_dir / "wal"), on_record=lambda lsn, t, body: got.append((lsn, t, body)))
    assert result.damage is None, result.damage
    return got


async def eventually(check, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def test_a_commit_is_acknowledged_only_once_a_majority_holds_it(group: Group) -> None:
    _, shard = await group.elect(0)
    assert (await commit(shard, put("c0", "k0", 0))).state is TxnState.COMMITTED

    group.net.cut(0, 1)
    group.net.cut(0, 2)
    pending = asyncio.ensure_future(shard.commit_one_phase(put("c1", "k1", 1)))
    done, _ = await asyncio.wait({pending}, timeout=0.5)
    assert not done, "acknowledged with only the primary's own fsync"
    assert shard.wal.durable_lsn >= shard.wal.last_lsn  # it is fsynced here: only the majority is missing
    assert shard.store.current("k1") is None  # nor applied: a failover could take it back

    group.net.heal()
    group.net.cut(0, 2)  # one follower is enough
    assert (await asyncio.wait_for(pending, 5)).state is TxnState.COMMITTED
    assert await values(shard, ["k1"]) == {"k1": 1}
    assert (await commit(shard, put("c2", "k2", 2))).state is TxnState.COMMITTED


async def test_a_slow_follower_does_not_hold_commits_back(group: Group) -> None:
    _, shard = await group.elect(0)
    group.net.pause(2)  # its calls hang (a stopped process)
    for i in range(20):
        assert (await asyncio.wait_for(commit(shard, put(f"c{i}", f"k{i}", i)), 5)).state is TxnState.COMMITTED
    group.net.resume(2)
    await eventually(lambda: group.members[2].durable_lsn == shard.wal.last_lsn)
    await eventually(lambda: group.members[2].applied_lsn == shard.wal.last_lsn)


async def test_a_follower_far_behind_is_sent_the_log_read_back_from_disk(tmp_path) -> None:
    # nothing kept in memory for shipping, tiny batches and segments: every record it lacks
    # is read back from the segment files, one batch after the other
    options = ReplicationOptions(heartbeat_seconds=0.02, retry_min_seconds=0.005, retry_max_seconds=0.05,
                                 recent_bytes=1, max_batch_bytes=300)
    g = Group(tmp_path, options=options, wal=WalConfig(segment_bytes=1024))
    await g.start_all()
    try:
        _, shard = await g.elect(0)
        g.net.cut(0, 2)
        for i in range(80):
            await commit(shard, put(f"c{i}", f"k{i}", i))
        assert len(shard.wal.wal.segments) > 3
        g.net.heal()
        await eventually(lambda: g.members[2].durable_lsn == shard.wal.last_lsn)
        await g.crash(0)
        assert log_records(g.data_dir(2)) == log_records(g.data_dir(0))
    finally:
        await g.close()


async def test_after_the_primary_dies_the_most_complete_member_takes_over_with_every_commit(group: Group) -> None:
    _, shard = await group.elect(0)
    await commit(shard, put("c-all", "all", 1))
    await eventually(lambda: group.members[2].durable_lsn == shard.wal.last_lsn)
    group.net.cut(0, 2)  # member 2 falls behind: acknowledged commits are on 0 and 1 only
    acknowledged = {}
    for i in range(15):
        await commit(shard, put(f"c{i}", f"k{i}", i))
        acknowledged[f"k{i}"] = i
    assert group.members[2].last_position < group.members[1].last_position
    await group.crash(0)
    group.net.heal()

    # member 2 runs the election; member 1's log is further along, so member 1 takes over
    winner, new = await group.elect(2)
    assert winner == 1 and new.epoch == group.etcd.term == 2
    assert await values(new, [*acknowledged, "all"]) == {**acknowledged, "all": 1}
    assert (await commit(new, put("after", "after", 1))).state is TxnState.COMMITTED
    await eventually(lambda: group.members[2].applied_lsn == new.wal.last_lsn)

    # the old primary comes back as a follower of term 2 and catches up
    old = await group.start(0)
    assert old.promised_term == 2 and old.voter
    await eventually(lambda: old.durable_lsn == new.wal.last_lsn)


async def test_a_deposed_primary_never_acknowledges_again(group: Group) -> None:
    _, old = await group.elect(0)
    await commit(old, put("c0", "k0", 0))
    await commit(old, put("c1", "k1", 1))
    await eventually(lambda: all(m.durable_lsn == old.wal.last_lsn for m in group.members.values()))
    group.net.cut(0, 1)  # member 0 still reaches member 2: with it, it would still be a majority

    winner, new = await group.elect(1)  # promises from 1 and 2 (0 unreachable from 1); a tie: 1
    assert winner == 1 and group.members[2].promised_term == 2
    # member 2 promised term 2: it refuses member 0's batches, so nothing 0 appends commits
    with pytest.raises(Unavailable):
        await asyncio.wait_for(old.commit_one_phase(put("c2", "k2", 2)), 5)
    await eventually(lambda: group.deposed == [(0, 2)])
    await eventually(lambda: group.members[0].role == "follower")
    # member 2 refused the old term's batch outright: it took nothing of it, cut nothing for it
    assert group.members[2].counters["refused_term"] >= 1
    assert group.members[2].counters["truncated_records"] == 0
    assert await values(new, ["k0", "k1", "k2"]) == {"k0": 0, "k1": 1}
    group.net.heal()
    await eventually(lambda: group.members[0].durable_lsn == new.wal.last_lsn)


async def test_the_old_primarys_divergent_tail_is_cut(group: Group) -> None:
    _, old = await group.elect(0)
    await commit(old, put("c0", "k0", 0))
    await eventually(lambda: all(m.durable_lsn == old.wal.last_lsn for m in group.members.values()))
    committed = old.wal.last_lsn
    group.net.isolate(0)
    stuck = [asyncio.ensure_future(old.commit_one_phase(put(f"lost{i}", f"lost{i}", i))) for i in range(3)]
    await asyncio.sleep(0.1)
    assert not any(t.done() for t in stuck)
    assert old.wal.durable_lsn == committed + 3  # on member 0's disk only

    winner, new = await group.elect(1)
    assert winner == 1
    await commit(new, put("c-new", "new", 1))
    group.net.heal()  # member 0's next batch is refused (term 2): deposed, then it follows term 2
    for t in stuck:
        with pytest.raises(Unavailable):
            await asyncio.wait_for(t, 5)
    await eventually(lambda: group.members[0].role == "follower"
                     and group.members[0].last_position == group.members[1].last_position)
    assert group.members[0].counters["truncated_records"] == 3
    assert group.members[0].terms.to_list() == [[1, 1], [2, committed + 1]]
    await group.crash(0)
    assert log_records(group.data_dir(0)) == log_records(group.data_dir(1))[: len(log_records(group.data_dir(0)))]
    assert not any(r[1] == RecordType.COMMIT_ONE_PHASE and r[2]["i"].startswith("lost")
                   for r in log_records(group.data_dir(0)))


async def test_a_member_that_lost_its_disk_rejoins_as_a_learner_and_becomes_a_voter(tmp_path) -> None:
    g = Group(tmp_path, snapshot_every_records=1_000_000, wal=WalConfig(segment_bytes=2048))
    await g.start_all()
    try:
        _, shard = await g.elect(0)
        for i in range(60):
            await commit(shard, put(f"c{i}", f"k{i}", i))
        await shard.snapshot()  # the primary drops the segments the snapshot covers
        for i in range(60, 70):
            await commit(shard, put(f"c{i}", f"k{i}", i))
        assert shard.wal.wal.first_lsn > 1

        await g.crash(2)
        shutil.rmtree(g.data_dir(2))
        learner = await g.start(2)
        assert not learner.voter and learner.promised_term == 1
        # a learner promises nothing: an election now cannot count it
        assert not (await learner.promise(5, 1)).granted
        await eventually(lambda: learner.voter)
        assert learner.counters["snapshots_installed"] == 1
        assert learner.durable_lsn >= shard.wal.commit_lsn
        for i in range(70, 75):
            await commit(shard, put(f"c{i}", f"k{i}", i))

        # the rejoined member holds every acknowledged commit: it can be the one elected
        await g.crash(0)
        await g.crash(1)
        await g.start(1)
        g.members[1].set_promised_term(g.etcd.term)
        winner, new = await g.elect(2)
        assert winner in (1, 2)
        keys = [f"k{i}" for i in range(75)]
        assert await values(new, keys) == {f"k{i}": i for i in range(75)}
    finally:
        await g.close()


async def test_two_phase_records_are_replicated_and_a_prepared_transaction_survives_failover(group: Group) -> None:
    _, shard = await group.elect(0)
    # this shard is a participant of a cross-shard transaction whose primary is shard 1
    prepared = ShardTxn(txn_id="x1", session=SESSION, writes={"p": msgpack.packb(1)}, participants=(0, 1),
                        primary=1)
    group.net.cut(0, 1)
    group.net.cut(0, 2)
    vote = asyncio.ensure_future(shard.prepare(prepared))
    done, _ = await asyncio.wait({vote}, timeout=0.3)
    assert not done, "voted YES before its PREPARE was on a majority"
    group.net.heal()
    assert (await asyncio.wait_for(vote, 5)).kind is VoteKind.YES

    finished = ShardTxn(txn_id="x2", session=SESSION, writes={"f": msgpack.packb(2)}, participants=(0, 1),
                        primary=1)
    assert (await shard.prepare(finished)).kind is VoteKind.YES
    assert (await shard.finish("x2", True)).state is TxnState.COMMITTED

    # acknowledged = on a majority: the primary and at least one follower, which one depends on
    # which answered first (a follower holds a prefix of the log, so one holds all three)
    wanted = {(RecordType.PREPARE, "x1"), (RecordType.PREPARE, "x2"), (RecordType.COMMIT, "x2")}
    held = [{(r[1], r[2].get("i")) for r in log_records(group.data_dir(i)) if r[1] != 255} for i in (1, 2)]
    assert any(wanted <= kinds for kinds in held), held

    await group.crash(0)
    _, new = await group.elect(1)
    assert "x1" in new.core.prepared  # resolved through its primary, as after a restart
    assert new.core.prepared["x1"].state is TxnState.PREPARED
    assert await values(new, ["f"]) == {"f": 2}


async def _prepared_then_cut_off(group: Group, txn_id: str) -> Shard:
    """A primary holding ``txn_id`` prepared (this shard a participant, shard 1 its primary),
    then cut from both followers: nothing it appends from now on is committed."""
    _, shard = await group.elect(0)
    txn = ShardTxn(txn_id=txn_id, session=SESSION, writes={"s": msgpack.packb(1)}, participants=(0, 1), primary=1)
    assert (await shard.prepare(txn)).kind is VoteKind.YES
    group.net.cut(0, 1)
    group.net.cut(0, 2)
    return shard


async def test_status_answers_committed_only_once_the_commit_record_is_on_a_majority(group: Group) -> None:
    """A participant applies a COMMIT before its record is committed (§5.5): meanwhile status
    answers PREPARED, since a failover would bring the transaction back PREPARED, and a
    repeated finish waits as the first does; the recovery sweep releases the primary's kept
    decision only when no participant answers PREPARED (PROTOCOL.md §10, R-6)."""
    shard = await _prepared_then_cut_off(group, "s1")
    finish = asyncio.ensure_future(shard.finish("s1", True))
    done, _ = await asyncio.wait({finish}, timeout=0.3)
    assert not done, "finish answered before its COMMIT was on a majority"
    assert shard.core.known("s1").state is TxnState.COMMITTED  # applied in memory already
    pending = await shard.status("s1")
    assert pending.state is TxnState.PREPARED, "COMMITTED answered before the record was on a majority"
    again = asyncio.ensure_future(shard.finish("s1", True))  # a retried commit id's finish
    done, _ = await asyncio.wait({again}, timeout=0.3)
    assert not done, "a repeated finish answered before the COMMIT was on a majority"

    group.net.heal()
    assert (await asyncio.wait_for(finish, 5)).state is TxnState.COMMITTED
    assert (await asyncio.wait_for(again, 5)).state is TxnState.COMMITTED
    status = await shard.status("s1")
    assert (status.state, status.primary, status.participants) == (TxnState.COMMITTED, 1, (0, 1))


async def test_a_cancelled_finish_still_lets_status_answer_committed_once_the_record_is_committed(
        group: Group) -> None:
    shard = await _prepared_then_cut_off(group, "s2")
    finish = asyncio.ensure_future(shard.finish("s2", True))
    await asyncio.sleep(0.05)
    finish.cancel()  # the coordinator's connection dropped: the record is on its way regardless
    pending = await shard.status("s2")
    assert pending.state is TxnState.PREPARED
    group.net.heal()
    committed = shard.wal.last_lsn
    await eventually(lambda: shard.wal.commit_lsn >= committed)
    status = await shard.status("s2")
    assert status.state is TxnState.COMMITTED


async def test_the_primary_exports_quorum_wait_lag_and_takeovers(group: Group) -> None:
    from oribus.metrics import REGISTRY, REPLICA_QUORUM_SECONDS, REPLICA_TAKEOVERS

    waits, takeovers = REPLICA_QUORUM_SECONDS.labels(shard="0"), REPLICA_TAKEOVERS.labels(shard="0")
    waits_before, takeovers_before = waits.count, takeovers.value
    _, shard = await group.elect(0)
    for i in range(3):
        await commit(shard, put(f"c{i}", f"k{i}", i))
    assert waits.count >= waits_before + 4  # the TERM_START and each commit
    assert takeovers.value == takeovers_before + 1
    assert 'oribus_replica_lag_records{shard="0",member="1"}' in REGISTRY.render()


async def test_a_primary_that_promises_a_higher_term_stops_acknowledging_at_once(group: Group) -> None:
    _, shard = await group.elect(0)
    await commit(shard, put("c0", "k0", 0))
    group.net.cut(0, 1)
    group.net.cut(0, 2)
    pending = asyncio.ensure_future(shard.commit_one_phase(put("c1", "k1", 1)))
    await asyncio.sleep(0.05)
    # a candidate of term 2 reaches member 0 itself: its promise deposes it before it answers
    reply = await group.members[0].promise(2, 1)
    assert reply.granted and group.members[0].role == "follower"
    group.net.heal()  # the followers would take term 1's batches again: nothing may come of it
    with pytest.raises(Unavailable):
        await asyncio.wait_for(pending, 5)
    assert group.deposed == [(0, 2)]
    with pytest.raises(Unavailable):
        await shard.commit_one_phase(put("c2", "k2", 2))


async def test_step_down_then_serve_again_in_a_later_term(group: Group) -> None:
    _, shard = await group.elect(0)
    await commit(shard, put("c0", "k0", 0))
    await group.members[0].step_down()  # its lease ran out, say
    assert group.members[0].role == "follower" and not group.members[0].is_primary
    with pytest.raises(Unavailable):
        await shard.commit_one_phase(put("c1", "k1", 1))
    await group.members[0].step_down()  # a no-op for a follower
    winner, again = await group.elect(0)
    assert winner == 0 and again.epoch == 2
    assert await values(again, ["k0"]) == {"k0": 0}
    assert (await commit(again, put("c2", "k2", 2))).state is TxnState.COMMITTED
    with pytest.raises(InvalidRequest):
        await group.members[0].become_primary(3, group.peers(0))  # already the primary


class _LeasingReader(ShardServiceByCalls):
    """A read-only participant that grants a lease to every validation and records the calls
    that end them."""

    def __init__(self) -> None:
        self.releases: list[tuple[str, tuple]] = []

    async def _call(self, op: str, *params: object) -> object:
        if op == "validate":
            return Vote(VoteKind.YES, lease=5.0)
        if op in ("release_lease", "release_leases"):
            self.releases.append((op, params))
            return None
        raise AssertionError(f"unexpected call {op}")

    def watch(self, request: object) -> object:
        raise NotImplementedError


async def test_commits_on_a_replica_group_that_finish_together_release_their_leases_in_one_call(
        group: Group) -> None:
    """One-writer commits whose writer is a replica group's primary: the majority's reply that
    commits all their records ends them in one loop turn, and their read leases elsewhere leave
    in one ``release_leases`` call, as with a single-copy writer (PROTOCOL.md §5.8)."""
    _, shard = await group.elect(0)
    reader = _LeasingReader()
    coordinator = Coordinator({0: shard, 1: reader}, lambda key: 1 if key.startswith("r") else 0)
    group.net.cut(0, 1)
    group.net.cut(0, 2)  # no majority: every commit waits at its record
    commits = [asyncio.ensure_future(coordinator.commit(CommitRequest(
        SESSION, f"c{i}", writes={f"w{i}": msgpack.packb(i)}, read_set={f"r{i}": 1}, tokens={1: (1, 1)})))
        for i in range(5)]
    done, _ = await asyncio.wait(commits, timeout=0.3)
    assert not done
    group.net.heal()
    results = await asyncio.wait_for(asyncio.gather(*commits), 5)
    assert [r.versions for r in results] == [{f"w{i}": 1} for i in range(5)]
    for _ in range(3):  # the release leaves in a background task
        await asyncio.sleep(0)
    assert reader.releases == [("release_leases", ([f"c{i}" for i in range(5)],))]


async def test_a_member_that_lost_its_disk_catches_up_with_the_primarys_lmdb_history(tmp_path) -> None:
    """With history_store="lmdb" a snapshot holds only current versions: the primary sends its
    engine's consistent copy with it, so the rejoined member answers ``history`` as the primary
    did, also for versions written before the snapshot (their WAL records are gone)."""
    small_chunks = dataclasses.replace(FAST, snapshot_chunk_bytes=1000)  # the frame spans many chunks
    g = Group(tmp_path, options=small_chunks, snapshot_every_records=1_000_000, wal=WalConfig(segment_bytes=2048),
              history_store="lmdb", history_limit=6)
    keys = [f"k{i}" for i in range(5)]
    await g.start_all()
    try:
        _, shard = await g.elect(0)
        n = 0
        for round_ in range(8):  # 8 versions per key: retention (6 kept) has dropped some too
            for k in keys:
                await commit(shard, put(f"c{n}", k, f"{k}@{round_}"))
                n += 1
        await shard.snapshot()  # the primary drops the segments the snapshot covers
        await commit(shard, put(f"c{n}", "k0", "k0@late"))
        n += 1
        assert shard.wal.wal.first_lsn > 1
        expected = {k: await shard.history(k) for k in keys}
        assert [e.version for e in expected["k1"]] == [8, 7, 6, 5, 4, 3]

        await g.crash(2)
        shutil.rmtree(g.data_dir(2))
        learner = await g.start(2)
        await eventually(lambda: learner.voter)
        assert learner.counters["snapshots_installed"] == 1
        assert (g.data_dir(2) / "history" / "data.mdb").exists()
        # the history file arrived beside the engine's and was renamed into place
        assert sorted(p.name for p in (g.data_dir(2) / "history").iterdir()) == ["data.mdb", "lock.mdb"]
        await eventually(lambda: learner._applied_lsn >= shard.wal.commit_lsn)
        assert learner.core is not None
        for k in keys:  # the follower's own applied state, history read from its engine
            assert learner.core.store.history(k) == expected[k], k

        # member 1 misses the last commits, so the rejoined member 2 is the one elected
        await g.crash(1)
        for k in keys[1:]:
            await commit(shard, put(f"c{n}", k, f"{k}@last"))
            n += 1
            expected[k] = await shard.history(k)
        await g.crash(0)
        await g.start(1)
        g.members[1].set_promised_term(g.etcd.term)
        winner, new = await g.elect(2)
        assert winner == 2
        for k in keys:
            assert await new.history(k) == expected[k], k
    finally:
        await g.close()


async def test_a_member_keeping_history_in_memory_refuses_a_catch_up_with_an_lmdb_history(group: Group, tmp_path) -> None:
    """Installed, a snapshot of an lmdb primary (current versions only) would leave a memory
    member without the history: members started with different --history-store fail closed."""
    _, shard = await group.elect(0)
    await commit(shard, put("c0", "k", 1))
    write_snapshot(tmp_path / "elsewhere", 10_000, {"state": "of an lmdb primary"})
    lsn, snapshot_file = latest_snapshot_file(tmp_path / "elsewhere")
    member = group.members[1]
    # the commit needs only a majority: let this follower hold it too, so nothing moves its log below
    async with asyncio.timeout(5):
        while member.last_position[1] < shard.wal.last_lsn:
            await asyncio.sleep(0.01)
    before = member.last_position
    reply = await member.install_snapshot(SnapshotChunk(
        term=group.etcd.term, primary=0, lsn=lsn, last_term=group.etcd.term, offset=0,
        data=pack_catchup(snapshot_file, b"an LMDB file"), done=True))
    assert not reply.ok
    assert member.counters["snapshots_installed"] == 0
    assert member.last_position == before and member.voter


async def test_a_primary_whose_term_is_starting_sends_its_lmdb_engine_with_a_snapshot(tmp_path) -> None:
    """Before its TERM_START is committed a new primary has no Shard, and a learner may already
    ask it for a snapshot: the copy of the member's own engine travels with it (sent alone,
    the snapshot, which holds only current versions, would leave the learner without the
    older ones; found by the simulation, tests/consistency/test_replicated_history_simulation.py)."""
    g = Group(tmp_path, snapshot_every_records=5, history_store="lmdb")
    await g.start_all()
    try:
        _, shard = await g.elect(0)
        for n in range(12):
            await commit(shard, put(f"c{n}", "k", n))
        follower = g.members[1]
        await eventually(lambda: follower.counters["snapshots"] > 0 and follower.applied_lsn >= shard.wal.commit_lsn)
        await g.crash(0)
        await g.crash(2)  # no majority: member 1's term starts and never begins
        term = g.etcd.next_term()
        starting = asyncio.create_task(follower.become_primary(term, g.peers(1)))
        await eventually(lambda: follower.role == "starting")
        source = await asyncio.get_running_loop().run_in_executor(None, follower._snapshot_source)
        assert source is not None
        lsn, data = source
        assert isinstance(data, CatchupSource), type(data)
        try:
            receiver = CatchupReceiver(tmp_path / "learner" / "incoming")
            receiver.feed(data[0:len(data)])
            _, history_file = receiver.finish()
        finally:
            data.close()
        assert history_file is not None
        LmdbHistory.install_file(tmp_path / "learner" / "history", history_file)
        engine = LmdbHistory(tmp_path / "learner" / "history", cache_bytes=1 << 20)
        try:
            older = [o[0] for o in engine.newest_first("k", 1 << 30, 1)]
        finally:
            engine.close()
        assert older and min(older) == 1, older  # the versions the snapshot leaves to the engine
        starting.cancel()
        with contextlib.suppress(asyncio.CancelledError, Unavailable):
            await starting
    finally:
        await g.close()


@pytest.mark.parametrize("store", ["memory", "lmdb"])
async def test_followers_drop_versions_by_age_as_the_primary_does(tmp_path, store: str) -> None:
    """The age rule runs on every member: a follower's store drops what is older than the max
    age by its own compaction (specs/engine.md "Retention"), so a member elected later starts
    with the history the rule keeps, not with every version since it last was primary."""
    max_age = 1.0
    group = Group(tmp_path, history_store=store, history_max_age_seconds=max_age, history_compaction_interval=0.02)
    await group.start_all()
    try:
        primary, shard = await group.elect(0)
        first = time.time()
        for v in range(5):  # stamped now, as a coordinator stamps its commits
            await commit(shard, dataclasses.replace(put(f"c{v}", "doc", v), committed_at=time.time()))
        followers = [m for i, m in group.members.items() if i != primary]
        await eventually(lambda: all(m.core is not None and m.core.store.version("doc") == 5 for m in followers))
        kept = [m.core.store.oldest_version("doc") for m in followers]
        if time.time() - first < max_age / 2:  # (a loaded machine may take longer to get here)
            assert kept == [1, 1], kept  # young yet: all kept
        await eventually(lambda: all(m.core.store.oldest_version("doc") == 5 for m in followers), 10 * max_age)
        assert [m.status()["history_dropped_by_age"] for m in followers] == [4, 4]
        assert [e.version for e in followers[0].core.store.history("doc")] == [5]  # the current stays
        await eventually(lambda: shard.store.oldest_version("doc") == 5, 10 * max_age)  # the primary's own rule
    finally:
        await group.close()
