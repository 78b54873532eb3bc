"""A replica group's member, follower side (oribus/shards/replica/member.py): the append rules
of specs/replication.md §3, promises (§5), learners (§7). Batches are built by hand here; the
primary that ships them is tested in tests/integration/test_replica_group.py."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from oribus.errors import InvalidRequest
from oribus.shards.manifest import read_manifest
from oribus.shards.replica import AppendBatch, ReplicaMember
from oribus.shards.txn import RecordType
from oribus.shards.wal import Wal, list_segments
from oribus.shards.wal.record import TERM_START, encode_record


def term_start(lsn: int, term: int) -> bytes:
    return encode_record(TERM_START, lsn, {"t": term, "m": 0})


def put(lsn: int, key: str, version: int = 1, value: bytes = b"v") -> bytes:
    return encode_record(RecordType.COMMIT_ONE_PHASE, lsn,
                         {"i": f"t{lsn}-{key}", "s": ["agent", "s"], "w": [[key, version, value, False]], "t": 0.0})


def batch(term: int, prev: tuple[int, int], *frames: bytes, commit: int = 0) -> AppendBatch:
    return AppendBatch(term=term, primary=0, prev=prev, frames=b"".join(frames),
                       last_lsn=prev[1] + len(frames), commit_lsn=commit)


def log_of(path: Path) -> list[tuple[int, int, object]]:
    got: list = []
    wal = Wal.open(path / "wal", on_record=lambda lsn, rtype, body: got.append((lsn, rtype, body)))
    wal._release()
    return got


async def member(path: Path, member_id: int = 1, **kw) -> ReplicaMember:
    return await ReplicaMember.open(path, 0, member_id, 3, **kw)


async def test_an_empty_directory_is_a_new_voter_only_before_any_term(tmp_path) -> None:
    new = await member(tmp_path / "new")
    assert new.voter and new.last_position == (0, 0) and new.promised_term == 0
    await new.close()
    lost = await member(tmp_path / "lost", term_register=4)
    assert not lost.voter and lost.promised_term == 4
    await lost.close()
    assert read_manifest(tmp_path / "lost").voter is False  # kept across restarts


async def test_accepts_a_batch_fsyncs_it_and_answers_its_end(tmp_path) -> None:
    m = await member(tmp_path)
    reply = await m.append(batch(1, (0, 0), term_start(1, 1), put(2, "a"), put(3, "b"), commit=0))
    assert reply.ok and reply.durable_lsn == 3 and reply.last == (1, 3) and reply.term == 1
    assert m.durable_lsn == 3 and m.promised_term == 1
    await m.close()
    assert [lsn for lsn, _, _ in log_of(tmp_path)] == [1, 2, 3]
    assert read_manifest(tmp_path).promised_term == 1  # a higher term is promised durably


async def test_refuses_a_lower_term_naming_its_own(tmp_path) -> None:
    m = await member(tmp_path)
    await m.append(batch(1, (0, 0), term_start(1, 1), put(2, "a")))
    assert (await m.promise(3, 2)).granted
    reply = await m.append(batch(1, (1, 2), put(3, "b")))
    assert not reply.ok and reply.term == 3 and reply.last == (1, 2)
    assert m.durable_lsn == 2
    await m.close()


async def test_refuses_where_the_logs_do_not_agree_naming_its_last_position(tmp_path) -> None:
    m = await member(tmp_path)
    await m.append(batch(1, (0, 0), term_start(1, 1), put(2, "a"), put(3, "b")))
    beyond = await m.append(batch(1, (1, 5), put(6, "x")))  # a gap
    assert not beyond.ok and beyond.last == (1, 3) and beyond.term == 1
    other_term = await m.append(batch(2, (2, 3), term_start(4, 2)))  # its record 3 is of term 1
    assert not other_term.ok and other_term.last == (1, 3)
    assert m.durable_lsn == 3
    assert (await m.append(batch(2, (1, 3), term_start(4, 2)))).ok
    await m.close()


async def test_a_divergent_tail_is_cut_and_replaced(tmp_path) -> None:
    m = await member(tmp_path)
    # term 2's primary got records 4 and 5 here only, then was replaced before committing them
    await m.append(batch(1, (0, 0), term_start(1, 1), put(2, "a"), put(3, "b"), commit=3))
    await m.append(batch(2, (1, 3), term_start(4, 2), put(5, "lost"), commit=3))
    assert m.last_position == (2, 5)
    # term 3's primary has its own record 4: the member keeps 1..3, cuts 4..5, appends
    reply = await m.append(batch(3, (1, 3), term_start(4, 3), put(5, "kept"), put(6, "c"), commit=3))
    assert reply.ok and reply.durable_lsn == 6 and m.last_position == (3, 6)
    assert m.counters["truncated_records"] == 2
    await m.close()
    got = log_of(tmp_path)
    assert [lsn for lsn, _, _ in got] == [1, 2, 3, 4, 5, 6]
    assert got[3][2] == {"t": 3, "m": 0} and got[4][2]["w"][0][0] == "kept"
    reopened = await member(tmp_path)
    assert reopened.last_position == (3, 6) and reopened.terms.to_list() == [[1, 1], [3, 4]]
    await reopened.close()


async def test_records_it_already_holds_are_kept_not_rewritten(tmp_path) -> None:
    m = await member(tmp_path)
    await m.append(batch(1, (0, 0), term_start(1, 1), put(2, "a"), put(3, "b")))
    # resent from further back (the primary lost a reply): nothing is cut
    reply = await m.append(batch(1, (1, 1), put(2, "a"), put(3, "b"), put(4, "c")))
    assert reply.ok and reply.durable_lsn == 4 and m.counters["truncated_records"] == 0
    # a heartbeat behind the member's end cuts nothing either, and answers only what it matched
    reply = await m.append(batch(1, (1, 2), commit=2))
    assert reply.ok and reply.durable_lsn == 2 and m.durable_lsn == 4
    await m.close()


async def test_applies_only_up_to_the_commit_index(tmp_path) -> None:
    m = await member(tmp_path)
    await m.append(batch(1, (0, 0), term_start(1, 1), put(2, "a"), put(3, "b"), put(4, "c"), commit=3))
    assert m.applied_lsn == 3
    assert m.core.store.current("b") is not None and m.core.store.current("c") is None
    await m.append(batch(1, (1, 2), commit=4))  # commit index 4, but agreement shown only to 2
    assert m.applied_lsn == 3
    await m.append(batch(1, (1, 4), commit=4))  # a heartbeat
    assert m.applied_lsn == 4 and m.core.store.current("c") is not None
    await m.close()


async def test_promises_only_go_up_and_are_durable(tmp_path) -> None:
    m = await member(tmp_path)
    await m.append(batch(1, (0, 0), term_start(1, 1), put(2, "a")))
    granted = await m.promise(5, 2)
    assert granted.granted and granted.term == 5 and granted.voter and granted.last == (1, 2)
    assert (await m.promise(5, 2)).granted  # the same request again
    lower = await m.promise(4, 0)
    assert not lower.granted and lower.term == 5
    await m.close()
    again = await member(tmp_path)
    assert again.promised_term == 5
    assert not (await again.promise(4, 0)).granted
    again.set_promised_term(7)
    assert not (await again.promise(6, 0)).granted
    await again.close()
    assert read_manifest(tmp_path).promised_term == 7


async def test_a_learner_promises_nothing_until_it_holds_the_commit_index(tmp_path) -> None:
    m = await member(tmp_path, term_register=1)
    assert not m.voter
    reply = await m.promise(2, 0)
    assert not reply.granted and not reply.voter and m.promised_term == 1
    # catching up: the primary's commit index is 3; the first batch reaches only 2
    assert not (await m.append(batch(1, (0, 0), term_start(1, 1), put(2, "a"), commit=3))).voter
    assert not m.voter
    reply = await m.append(batch(1, (1, 2), put(3, "b"), put(4, "c"), commit=3))
    assert reply.ok and reply.voter and m.voter
    await m.close()
    assert read_manifest(tmp_path).voter  # fsynced before it answered
    reopened = await member(tmp_path, term_register=1)
    assert reopened.voter and (await reopened.promise(2, 0)).granted
    await reopened.close()


async def test_damaged_data_opens_as_a_learner_with_the_files_moved_aside(tmp_path) -> None:
    m = await member(tmp_path)
    await m.append(batch(1, (0, 0), term_start(1, 1), *(put(i, f"k{i}") for i in range(2, 30)), commit=29))
    await m.close()
    segment = list_segments(tmp_path / "wal")[0].path
    data = bytearray(segment.read_bytes())
    data[100] ^= 0xFF  # inside an early record, acknowledged records after it
    segment.write_bytes(bytes(data))
    damaged = await member(tmp_path, term_register=1)
    assert not damaged.voter and damaged.last_position == (0, 0) and damaged.promised_term == 1
    assert len(list(tmp_path.glob("damaged-*/wal/*.wal"))) == 1
    await damaged.close()


async def test_missing_segments_open_as_a_learner(tmp_path) -> None:
    m = await member(tmp_path)
    await m.append(batch(1, (0, 0), term_start(1, 1), put(2, "a"), commit=2))
    await m.close()
    for segment in list_segments(tmp_path / "wal"):
        segment.path.unlink()
    lost = await member(tmp_path, term_register=1)
    assert not lost.voter and lost.last_position == (0, 0)
    await lost.close()


async def test_a_directory_of_another_member_or_shard_is_refused(tmp_path) -> None:
    m = await member(tmp_path, member_id=1)
    await m.close()
    with pytest.raises(InvalidRequest, match="member 1"):
        await member(tmp_path, member_id=2)
    with pytest.raises(InvalidRequest, match="shard 0"):
        await ReplicaMember.open(tmp_path, 5, 1, 3)
    with pytest.raises(InvalidRequest):
        await ReplicaMember.open(tmp_path / "one", 0, 0, 1)  # replicas=1 is a plain Shard


async def test_a_learner_is_not_promoted_against_a_new_primarys_empty_commit_index(tmp_path) -> None:
    # term 1 committed records 1..4 on members 0 and 2; member 2 lost its disk. Member 0 is
    # elected in term 2: until its TERM_START (LSN 5) is committed its commit index is 0,
    # which says nothing of the records term 1 acknowledged.
    m = await member(tmp_path, member_id=2, term_register=2)
    assert not m.voter
    reply = await m.append(batch(2, (0, 0), term_start(1, 1), put(2, "a"), commit=0))
    assert reply.ok and not reply.voter and not m.voter, "a voter lacking acknowledged records 3 and 4"
    reply = await m.append(batch(2, (1, 2), put(3, "b"), put(4, "c"), term_start(5, 2), commit=4))
    assert reply.ok and not m.voter  # term 1's records only: still not known to be all of them
    reply = await m.append(batch(2, (2, 5), commit=5))
    assert reply.ok and reply.voter and m.voter
    await m.close()


async def test_records_it_holds_but_has_not_fsynced_are_not_acknowledged(tmp_path) -> None:
    # An append cancelled while its fsync ran (the primary's connection dropped) leaves the
    # frames in the log, not yet durable; the resent batch finds them there and must not
    # answer for them before they are.
    from oribus import failpoints

    m = await member(tmp_path)
    await m.append(batch(1, (0, 0), term_start(1, 1)))
    failpoints.arm("wal.before_fsync", "sleep:0.5")
    try:
        first = asyncio.ensure_future(m.append(batch(1, (1, 1), put(2, "a"), put(3, "b"))))
        await asyncio.sleep(0.1)
        first.cancel()
        reply = await m.append(batch(1, (1, 1), put(2, "a"), put(3, "b")))
        assert reply.ok and m.durable_lsn >= reply.durable_lsn == 3
    finally:
        failpoints.disarm()
    await m.close()


async def test_an_append_whose_caller_gives_up_leaves_the_member_consistent(tmp_path) -> None:
    from oribus import failpoints

    m = await member(tmp_path)
    await m.append(batch(1, (0, 0), term_start(1, 1), put(2, "a"), commit=2))
    # a divergent tail to cut, then an fsync that takes a while: the caller gives up meanwhile
    await m.append(batch(1, (1, 2), put(3, "old"), put(4, "old"), commit=2))
    failpoints.arm("wal.before_fsync", "sleep:0.3")
    try:
        call = asyncio.ensure_future(m.append(batch(2, (1, 2), term_start(3, 2), put(4, "new"), commit=4)))
        await asyncio.sleep(0.1)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
    finally:
        failpoints.disarm()
    # the next call waits for the first to finish: the tail is cut, the new records are in,
    # fsynced and applied as the batch said
    reply = await m.append(batch(2, (2, 4), commit=4))
    assert reply.ok and m.last_position == (2, 4) and m.applied_lsn == 4
    assert m.counters["truncated_records"] == 2 and m.terms.to_list() == [[1, 1], [2, 3]]
    await m.close()
    assert [body.get("w", [[None]])[0][0] for _, _, body in log_of(tmp_path)] == [None, "a", None, "new"]
