"""The session journal: what a restarted bus knows of sessions whose clients send no tokens."""

from __future__ import annotations

import os

import pytest

from oribus.bus.session_journal import SessionJournal
from oribus.bus.sessions import SessionLimits, SessionTable
from oribus.errors import SessionExpired, Unavailable

A = ("agent-a", "sbus")
B = ("agent-b", "sbus")


async def test_first_token_survives_reopen_and_reset_forgets(tmp_path):
    j = await SessionJournal.open(tmp_path)
    table = SessionTable(journal=j)
    await table.observe_durably(A, 0, (11, 1))
    await table.observe_durably(A, 0, (12, 5))  # a later token never replaces the first
    await table.observe_durably(A, 1, (21, 2))
    await table.observe_durably(B, 1, (21, 3))
    await table.reset(B)
    await j.close()

    j2 = await SessionJournal.open(tmp_path)
    table2 = SessionTable(journal=j2)
    assert table2.tokens(A) == {0: (11, 1), 1: (21, 2)}
    assert table2.tokens(B) == {}
    assert table2.durable_sessions == 1
    await j2.close()


async def test_volatile_sessions_are_not_journaled(tmp_path):
    j = await SessionJournal.open(tmp_path)
    table = SessionTable(journal=j)
    table.observe(A, 0, (1, 1))  # an SDK session: it sends its own tokens
    await j.close()
    j2 = await SessionJournal.open(tmp_path)
    assert j2.table == {}
    await j2.close()


async def test_torn_tail_loses_only_the_unacknowledged_record(tmp_path):
    j = await SessionJournal.open(tmp_path)
    await j.observe(A, 0, (1, 1))
    await j.observe(B, 0, (1, 2))
    await j.close()
    seg = sorted(tmp_path.glob("*.wal"))[-1]  # the last segment
    size = seg.stat().st_size
    with open(seg, "r+b") as f:  # cut the last record in half: a crash mid-write
        f.truncate(size - 5)
    j2 = await SessionJournal.open(tmp_path)
    assert j2.table == {A: {0: (1, 1)}}
    await j2.close()


async def test_compaction_keeps_exactly_the_live_table(tmp_path):
    j = await SessionJournal.open(tmp_path)
    for i in range(3000):  # many sessions that come and go
        s = (f"agent-{i}", "sbus")
        await j.observe(s, i % 3, (7, i))
        if i % 10:
            await j.reset(s)
    live = {(f"agent-{i}", "sbus"): {i % 3: (7, i)} for i in range(0, 3000, 10)}
    await j.close()
    before = sum(p.stat().st_size for p in tmp_path.iterdir())
    j2 = await SessionJournal.open(tmp_path)  # replays 5,700 records for 300 live ones: compacts
    assert j2.table == live
    await j2.close()
    after = sum(p.stat().st_size for p in tmp_path.iterdir())
    assert after < before / 3
    j3 = await SessionJournal.open(tmp_path)
    assert j3.table == live
    await j3.close()


async def test_caps_evict_the_most_idle_session_of_the_group_which_then_fails_closed(tmp_path):
    """A full group never refuses a new session (that let one client lock every new agent
    out): its least recently active session is evicted and refused once, durably."""
    j = await SessionJournal.open(tmp_path)
    table = SessionTable(journal=j, limits=SessionLimits(max_sessions=4, max_per_agent=2, max_per_client=3))
    await table.observe_durably(("flood", "1"), 0, (1, 1), client="10.0.0.9")
    await table.observe_durably(("flood", "2"), 0, (1, 2), client="10.0.0.9")
    await table.observe_durably(("flood", "3"), 0, (1, 3), client="10.0.0.9")  # per agent: evicts flood/1
    assert table.evicted == {"sessions": 0, "agent": 1, "client": 0}
    await table.observe_durably(("other", "1"), 0, (1, 4), client="10.0.0.9")
    await table.observe_durably(("third", "1"), 0, (1, 5), client="10.0.0.9")  # per client: evicts flood/2
    assert table.evicted == {"sessions": 0, "agent": 1, "client": 1}
    await table.observe_durably(A, 0, (1, 6), client="10.0.0.1")
    await table.observe_durably(B, 0, (1, 7), client="10.0.0.2")  # in all: evicts flood/3
    assert table.evicted == {"sessions": 1, "agent": 1, "client": 1}
    assert table.durable_sessions == 4 and table.tokens(("flood", "1")) == {}
    await table.check_not_marked(A)  # never evicted: nothing to refuse
    for evicted in (("flood", "1"), ("flood", "2"), ("flood", "3")):
        with pytest.raises(SessionExpired, match="evicted"):
            await table.check_not_marked(evicted)
    await j.close()

    # durable: a restarted bus still refuses the evicted session it was not told about
    j2 = await SessionJournal.open(tmp_path)
    assert j2.is_marked(("flood", "1")) and not j2.is_marked(A)
    # ... and knows which were already refused once (flood/1's acknowledgement was itself
    # evicted again by the per-agent cap when flood/3's was recorded)
    assert j2.acked == {("flood", "2"), ("flood", "3")}
    table2 = SessionTable(journal=j2)
    await table2.check_not_marked(("flood", "3"))  # acknowledged before the restart
    with pytest.raises(SessionExpired):
        await table2.check_not_marked(("flood", "1"))
    await j2.close()


async def test_marks_survive_compaction_and_are_cleared_by_clear_marks(tmp_path):
    j = await SessionJournal.open(tmp_path)
    table = SessionTable(journal=j)
    for i in range(1200):  # enough records to compact at the next open
        await table.observe_durably((f"m{i}", "s"), 0, (1, i))
        await table.reset((f"m{i}", "s"), caller_owns=False)
    await j.close()
    j2 = await SessionJournal.open(tmp_path)
    assert len(list(tmp_path.glob("*.wal"))) == 1  # compacted
    assert all(j2.is_marked((f"m{i}", "s")) for i in range(1200))
    table2 = SessionTable(journal=j2)
    with pytest.raises(SessionExpired, match="reset by another caller"):  # the reason itself is not journaled
        await table2.check_not_marked(("m7", "s"))
    await table2.clear_marks()
    await j2.close()
    j3 = await SessionJournal.open(tmp_path)
    assert not any(j3.is_marked((f"m{i}", "s")) for i in range(1200)) and not j3.acked
    await j3.close()


async def test_token_is_in_memory_only_after_it_is_durable(tmp_path, monkeypatch):
    j = await SessionJournal.open(tmp_path)
    table = SessionTable(journal=j)

    def broken(fd):
        raise OSError(5, "EIO")

    monkeypatch.setattr(os, "fdatasync", broken)
    with pytest.raises(Unavailable, match="EIO|fsync|sync"):  # the WAL reports the failed sync
        await table.observe_durably(A, 0, (1, 1))
    assert table.tokens(A) == {}  # a read whose token is not durable is not answered
    monkeypatch.undo()
    await j.close()


async def test_only_the_opener_owns_a_session_and_ownership_outlives_a_restart(tmp_path):
    j = await SessionJournal.open(tmp_path)
    table = SessionTable(journal=j)
    token = await table.open(A)
    assert token and table.is_owner(A, token) and not table.is_owner(A, "guess") and not table.is_owner(A, None)
    assert await table.open(A) is None  # a session in use cannot be claimed again
    await table.observe_durably(A, 0, (1, 1))
    await table.observe_durably(B, 0, (1, 2))
    assert await table.open(B) is None  # nor one with reads
    assert await table.reset(B, caller_owns=False) is True  # marked: its next commit fails closed
    assert await table.open(B) is None  # nor a marked one
    assert await table.reset(A, caller_owns=table.is_owner(A, token)) is False
    await j.close()
    j2 = await SessionJournal.open(tmp_path)
    table2 = SessionTable(journal=j2)
    assert table2.is_owner(A, token)
    with pytest.raises(SessionExpired):
        await table2.check_not_marked(B)
    await table2.check_not_marked(A)
    await j2.close()


async def test_identity_owners_outlive_reset_mark_reopen_and_compaction(tmp_path):
    """Under --auth a session's owner (specs/auth.md §5) is journaled: a reset or an eviction
    keeps it, and so do a restart and the compaction a restart may do."""
    j = await SessionJournal.open(tmp_path)
    await j.own_by(A, "orchestrator")
    await j.own_by(A, "agent-a")  # a later record never replaces the first claim
    await j.own_by(B, "agent-b")
    await j.reset(A)
    await j.mark(B)
    for i in range(1500):  # enough dead records to compact on the next open
        await j.observe((f"x{i}", "s"), 0, (1, i))
        await j.reset((f"x{i}", "s"))
    await j.close()
    for _ in range(2):  # the first open compacts, the second reads the compacted journal
        j = await SessionJournal.open(tmp_path)
        assert j.identities == {A: "orchestrator", B: "agent-b"}
        await j.close()
    assert len(list(tmp_path.glob("*.wal"))) == 1
