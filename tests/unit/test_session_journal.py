"""The session journal: what a restarted bus knows of sessions whose clients send no tokens."""

from __future__ import annotations

import os

import pytest

from oribus.bus.session_journal import SessionJournal
from oribus.bus.sessions import SessionTable
from oribus.errors import LimitExceeded

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


async def test_full_journal_refuses_new_sessions_rather_than_evicting(tmp_path):
    j = await SessionJournal.open(tmp_path, max_sessions=2)
    table = SessionTable(journal=j)
    await table.observe_durably(A, 0, (1, 1))
    await table.observe_durably(B, 0, (1, 2))
    with pytest.raises(LimitExceeded):
        await table.observe_durably(("agent-c", "sbus"), 0, (1, 3))
    await table.observe_durably(A, 1, (2, 1))  # a known session still records
    assert table.tokens(A) == {0: (1, 1), 1: (2, 1)}
    await j.close()


async def test_token_is_in_memory_only_after_it_is_durable(tmp_path, monkeypatch):
    j = await SessionJournal.open(tmp_path)
    table = SessionTable(journal=j)

    def broken(fd):
        raise OSError(5, "EIO")

    monkeypatch.setattr(os, "fdatasync", broken)
    with pytest.raises(Exception):  # noqa: B017 - the WAL reports Unavailable
        await table.observe_durably(A, 0, (1, 1))
    assert table.tokens(A) == {}  # a read whose token is not durable is not answered
    monkeypatch.undo()
    await j.close()
