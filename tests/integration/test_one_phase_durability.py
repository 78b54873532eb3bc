"""A one-phase commit whose record reached the WAL is carried out by the flush that makes it
durable, whether or not its caller still waits (``Shard.commit_one_phase``)."""

from __future__ import annotations

import asyncio
import os
import threading

import oribus

REAL_FDATASYNC = os.fdatasync


async def test_a_cancelled_one_phase_commit_is_applied_once_durable(tmp_path, monkeypatch):
    entered, release = threading.Event(), threading.Event()

    def gated(fd: int) -> None:
        if not release.is_set():
            entered.set()
            assert release.wait(30), "the test never released the fsync"
        REAL_FDATASYNC(fd)

    bus = await oribus.open_local(tmp_path / "data", agent="a")
    try:
        await bus.put("k", 0)
        monkeypatch.setattr(os, "fdatasync", gated)
        commit = asyncio.create_task(bus.commit({"k": 1}, commit_id="cancelled-1"))
        assert await asyncio.to_thread(entered.wait, 30)  # its record is in the flush, fsync blocked
        commit.cancel()  # the client goes away
        await asyncio.gather(commit, return_exceptions=True)
        release.set()
        for _ in range(200):
            if (await bus.get("k")).version == 2:
                break
            await asyncio.sleep(0.01)
        item = await bus.get("k")
        assert (item.value, item.version) == (1, 2)  # applied: durable, so it must be visible
        await bus.put("k", 2)  # the next commit builds on it (no replay over it later)
        assert [h.commit_id for h in await bus.history("k")][1] == "cancelled-1"
    finally:
        release.set()
        await bus.close()
    reopened = await oribus.open_local(tmp_path / "data", agent="a")
    try:
        assert [(h.version, h.value) for h in await reopened.history("k")] == [(3, 2), (2, 1), (1, 0)]
    finally:
        await reopened.close()
