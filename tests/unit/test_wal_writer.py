"""The WAL append side (writer.py): group commit, durability, rollover, failure."""

from __future__ import annotations

import asyncio
import errno
import os
import threading
from pathlib import Path

import pytest

from oribus import failpoints
from oribus.errors import Unavailable
from oribus.failpoints import FailpointHit
from oribus.shards.wal import SEGMENT_HEADER_SIZE, Wal, WalConfig, list_segments
from oribus.shards.wal import writer as writer_module

REAL_FDATASYNC = os.fdatasync


@pytest.fixture(autouse=True)
def _disarm_failpoints():
    yield
    failpoints.disarm()


class BlockingFdatasync:
    """Replaces os.fdatasync; the first call blocks until ``release`` is set."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.calls = 0

    def __call__(self, fd: int) -> None:
        self.calls += 1
        if self.calls == 1:
            self.entered.set()
            if not self.release.wait(30):
                raise AssertionError("test never released the blocked fsync")
        REAL_FDATASYNC(fd)

    async def wait_entered(self) -> None:
        assert await asyncio.to_thread(self.entered.wait, 30)


async def read_back(path: Path, **kwargs) -> list:
    """Reopen the log at ``path`` and return every record replayed."""
    got: list = []
    wal = Wal.open(
        path, on_record=lambda lsn, rtype, body: got.append((lsn, rtype, body)), **kwargs
    )
    await wal.close()
    return got


async def test_append_assigns_consecutive_lsns_and_buffers_in_memory(tmp_path):
    wal = Wal.open(tmp_path)
    size = list_segments(tmp_path)[0].path.stat().st_size
    assert size == SEGMENT_HEADER_SIZE
    assert [wal.append(1, {"i": i}) for i in range(5)] == [1, 2, 3, 4, 5]
    assert wal.last_lsn == 5
    assert wal.durable_lsn == 0
    assert list_segments(tmp_path)[0].path.stat().st_size == size  # nothing written yet
    await wal.sync()
    assert wal.durable_lsn == 5
    assert list_segments(tmp_path)[0].path.stat().st_size > size
    await wal.close()


async def test_sync_of_an_earlier_lsn_makes_it_durable(tmp_path):
    wal = Wal.open(tmp_path)
    for i in range(3):
        wal.append(1, i)
    await wal.sync(2)
    assert wal.durable_lsn >= 2
    await wal.close()


async def test_sync_of_a_durable_lsn_does_not_fsync_again(tmp_path):
    wal = Wal.open(tmp_path)
    wal.append(1, "a")
    await wal.sync()
    fsyncs = wal.stats["fsyncs"]
    assert fsyncs == 1
    await wal.sync(1)
    await wal.sync()
    assert wal.stats["fsyncs"] == fsyncs
    await wal.close()


async def test_sync_beyond_the_last_lsn_is_refused(tmp_path):
    wal = Wal.open(tmp_path)
    wal.append(1, "a")
    with pytest.raises(ValueError):
        await wal.sync(2)
    await wal.close()


async def test_group_commit_batches_concurrent_writers(tmp_path):
    wal = Wal.open(tmp_path)

    async def commit(i: int) -> int:
        lsn = wal.append(1, {"k": f"key-{i}", "v": i})
        await wal.sync(lsn)
        assert wal.durable_lsn >= lsn
        return lsn

    lsns = await asyncio.gather(*(commit(i) for i in range(200)))
    assert sorted(lsns) == list(range(1, 201))
    stats = wal.stats
    assert stats["records"] == 200
    assert stats["fsyncs"] < stats["records"]
    # Every append happens before the first flush completes, so at most the
    # first flush and one follow-up are needed.
    assert stats["fsyncs"] <= 2
    assert stats["avg_records_per_fsync"] >= 100
    await wal.close()
    got = await read_back(tmp_path)
    assert [lsn for lsn, _, _ in got] == list(range(1, 201))


async def test_records_appended_during_a_flush_share_the_next_fsync(tmp_path, monkeypatch):
    gate = BlockingFdatasync()
    monkeypatch.setattr(os, "fdatasync", gate)
    wal = Wal.open(tmp_path)

    first = asyncio.create_task(wal.sync(wal.append(1, "first")))
    await gate.wait_entered()  # the first batch is written and its fsync is blocked
    assert wal.durable_lsn == 0  # written is not durable
    # All 50 are appended while the first fsync is blocked.
    later = [asyncio.create_task(wal.sync(wal.append(1, i))) for i in range(50)]
    gate.release.set()
    await asyncio.gather(first, *later)

    assert wal.durable_lsn == 51
    assert wal.stats["fsyncs"] == 2
    assert wal.stats["batches"] == 2
    await wal.close()


async def test_durable_lsn_moves_only_after_fsync(tmp_path, monkeypatch):
    calls = []
    wal = Wal.open(tmp_path)
    segment = list_segments(tmp_path)[0].path

    def observe(name: str) -> None:
        calls.append((name, wal.durable_lsn, segment.stat().st_size > SEGMENT_HEADER_SIZE))

    monkeypatch.setattr(writer_module, "failpoint", observe)
    lsn = wal.append(1, "x")
    await wal.sync(lsn)
    assert calls == [
        ("wal.before_append", 0, False),
        ("wal.after_append", 0, True),
        ("wal.before_fsync", 0, True),
        ("wal.after_fsync", 0, True),
    ]
    assert wal.durable_lsn == lsn
    await wal.close()


async def test_failpoints_are_reachable(tmp_path):
    failpoints.trace()
    try:
        wal = Wal.open(tmp_path)
        wal.append(1, "x")
        await wal.sync()
        await wal.close()
        hits = failpoints.hits()
    finally:
        failpoints.trace(False)
    for name in ("wal.before_append", "wal.after_append", "wal.before_fsync", "wal.after_fsync"):
        assert hits.get(name) == 1, name


async def test_before_append_failpoint_consumes_no_lsn(tmp_path):
    wal = Wal.open(tmp_path)
    failpoints.arm("wal.before_append", "raise")
    with pytest.raises(FailpointHit):
        wal.append(1, "x")
    failpoints.disarm()
    assert wal.last_lsn == 0
    assert wal.append(1, "y") == 1
    await wal.close()


async def test_failing_fsync_fails_every_waiter_and_poisons_the_wal(tmp_path, monkeypatch):
    def failing(fd: int) -> None:
        raise OSError(errno.EIO, "simulated I/O error")

    monkeypatch.setattr(os, "fdatasync", failing)
    wal = Wal.open(tmp_path)

    async def commit(i: int) -> int:
        lsn = wal.append(1, i)
        await wal.sync(lsn)
        return lsn

    results = await asyncio.gather(*(commit(i) for i in range(20)), return_exceptions=True)
    assert all(isinstance(r, Unavailable) for r in results), results
    error = results[0]
    assert all(r is error for r in results)
    assert "wal write failed" in str(error)
    assert isinstance(error.__cause__, OSError) and error.__cause__.errno == errno.EIO
    assert wal.durable_lsn == 0

    monkeypatch.setattr(os, "fdatasync", REAL_FDATASYNC)  # the disk "recovers"; the WAL must not
    with pytest.raises(Unavailable) as excinfo:
        wal.append(1, "later")
    assert excinfo.value is error
    with pytest.raises(Unavailable) as excinfo:
        await wal.sync()
    assert excinfo.value is error
    with pytest.raises(Unavailable):
        wal.sync_now()
    assert wal.durable_lsn == 0
    await wal.close()  # releases the file without raising again


async def test_failpoint_in_a_flush_poisons_the_wal(tmp_path):
    wal = Wal.open(tmp_path)
    failpoints.arm("wal.before_fsync", "raise")
    wal.append(1, "x")
    with pytest.raises(Unavailable) as excinfo:
        await wal.sync()
    assert isinstance(excinfo.value.__cause__, FailpointHit)
    failpoints.disarm()
    with pytest.raises(Unavailable):
        await wal.sync()
    await wal.close()


async def test_cancelled_waiter_does_not_cancel_the_flush(tmp_path, monkeypatch):
    gate = BlockingFdatasync()
    monkeypatch.setattr(os, "fdatasync", gate)
    wal = Wal.open(tmp_path)
    lsn = wal.append(1, "x")
    impatient = asyncio.create_task(wal.sync(lsn))
    patient = asyncio.create_task(wal.sync(lsn))
    await gate.wait_entered()
    impatient.cancel()
    with pytest.raises(asyncio.CancelledError):
        await impatient
    gate.release.set()
    await patient
    assert wal.durable_lsn == lsn
    await wal.close()


async def test_flushes_run_on_the_wals_own_thread_until_close(tmp_path, monkeypatch):
    """One flush thread per WAL (not the loop's default executor), the same for every flush,
    and gone once the WAL is closed."""
    threads = []

    def record_thread(fd: int) -> None:
        threads.append(threading.current_thread())
        REAL_FDATASYNC(fd)

    monkeypatch.setattr(os, "fdatasync", record_thread)
    wal = Wal.open(tmp_path / "a")
    other = Wal.open(tmp_path / "b")
    for i in range(3):
        await wal.sync(wal.append(1, {"i": i}))
    await other.sync(other.append(1, {}))
    mine, theirs = set(threads[:3]), threads[3]
    assert len(mine) == 1 and theirs not in mine
    (flusher,) = mine
    assert flusher.name.startswith("wal-flush") and flusher.is_alive()
    wal.append(1, {"last": True})
    await wal.close()  # the last record is flushed on that thread too, then it ends
    assert threads[4] is flusher and not flusher.is_alive()
    await other.close()
    assert len(await read_back(tmp_path / "a")) == 4


async def test_unsafe_no_fsync_never_fsyncs(tmp_path, monkeypatch):
    def forbidden(fd: int) -> None:
        raise AssertionError("fdatasync called with unsafe_no_fsync")

    monkeypatch.setattr(os, "fdatasync", forbidden)
    wal = Wal.open(tmp_path, WalConfig(segment_bytes=200, unsafe_no_fsync=True))
    for i in range(30):
        wal.append(1, {"i": i, "pad": "x" * 20})
        await wal.sync()
    assert wal.durable_lsn == 30
    assert wal.stats["fsyncs"] == 0
    assert len(list_segments(tmp_path)) > 1
    await wal.close()
    got = await read_back(tmp_path, config=WalConfig(unsafe_no_fsync=True))
    assert len(got) == 30


async def test_segments_roll_over_at_batch_boundaries(tmp_path):
    wal = Wal.open(tmp_path, WalConfig(segment_bytes=300))
    for batch in range(10):
        for i in range(4):
            wal.append(1, {"batch": batch, "i": i, "pad": "y" * 30})
        await wal.sync()
    segments = list_segments(tmp_path)
    assert len(segments) > 3
    assert wal.segments == segments
    # Each batch of 4 lands in one segment, so every segment starts a batch.
    assert all((s.first_lsn - 1) % 4 == 0 for s in segments)
    assert [s.seq for s in segments] == list(range(len(segments)))
    await wal.close()
    got = await read_back(tmp_path)
    assert [lsn for lsn, _, _ in got] == list(range(1, 41))


async def test_roll_forces_a_new_segment(tmp_path):
    wal = Wal.open(tmp_path)
    wal.roll()  # the active segment is empty: nothing to roll
    wal.append(1, "a")
    await wal.sync()
    assert len(list_segments(tmp_path)) == 1
    wal.roll()
    wal.append(1, "b")
    await wal.sync()
    segments = list_segments(tmp_path)
    assert [s.first_lsn for s in segments] == [1, 2]
    await wal.close()


async def test_remove_segments_before(tmp_path):
    wal = Wal.open(tmp_path, WalConfig(segment_bytes=200))
    for i in range(60):
        wal.append(1, {"i": i, "pad": "z" * 20})
        wal.sync_now()
    segments = list_segments(tmp_path)
    assert len(segments) >= 4
    assert wal.remove_segments_before(segments[0].first_lsn) == 0
    # Segment 1 still holds LSN first_lsn(2) - 1, so only segment 0 goes.
    assert wal.remove_segments_before(segments[2].first_lsn - 1) == 1
    assert wal.remove_segments_before(segments[2].first_lsn) == 1
    assert list_segments(tmp_path) == segments[2:]
    assert wal.remove_segments_before(10**9) == len(segments) - 3  # all but the active one
    assert list_segments(tmp_path) == segments[-1:]
    assert wal.append(1, "still appending") == 61
    await wal.close()
    got = await read_back(tmp_path, replay_from_lsn=61)
    assert got == [(61, 1, "still appending")]


async def test_close_flushes_buffered_records_and_is_idempotent(tmp_path):
    wal = Wal.open(tmp_path)
    for i in range(7):
        wal.append(2, i)
    await wal.close()
    await wal.close()
    with pytest.raises(Unavailable, match="closed"):
        wal.append(1, "x")
    with pytest.raises(Unavailable, match="closed"):
        await wal.sync()
    got = await read_back(tmp_path)
    assert got == [(i + 1, 2, i) for i in range(7)]


async def test_async_context_manager_closes(tmp_path):
    async with Wal.open(tmp_path) as wal:
        wal.append(1, "x")
    with pytest.raises(Unavailable):
        wal.append(1, "y")
    got = await read_back(tmp_path)
    assert got == [(1, 1, "x")]


async def test_sync_now_writes_and_fsyncs(tmp_path):
    wal = Wal.open(tmp_path)
    wal.append(1, "a")
    wal.append(1, "b")
    wal.sync_now()
    assert wal.durable_lsn == 2
    assert wal.stats["fsyncs"] == 1
    assert wal.stats["records"] == 2
    assert wal.stats["bytes"] > 0
    await wal.close()


def test_invalid_record_type_consumes_no_lsn(tmp_path):
    wal = Wal.open(tmp_path)
    with pytest.raises(ValueError):
        wal.append(0, "x")
    with pytest.raises(ValueError):
        wal.append(256, "x")
    assert wal.append(255, "x") == 1
    asyncio.run(wal.close())


async def test_stats_report_fsync_timing(tmp_path):
    wal = Wal.open(tmp_path)
    for _ in range(3):
        wal.append(1, "x")
        await wal.sync()
    stats = wal.stats
    assert set(stats) == {
        "fsyncs",
        "records",
        "bytes",
        "batches",
        "last_fsync_seconds",
        "avg_fsync_seconds",
        "avg_records_per_fsync",
    }
    assert stats["fsyncs"] == stats["batches"] == stats["records"] == 3
    assert stats["avg_fsync_seconds"] > 0
    assert stats["avg_records_per_fsync"] == 1
    await wal.close()


# ---- when_durable: the callback hand-off of one-phase commits -----------------------------


async def test_when_durable_calls_back_in_order_once_fsynced(tmp_path, monkeypatch):
    """Records appended while a flush is in flight are called back by the next flush, in
    order, only once fsynced; one flush calls back every record it covered."""
    gate = BlockingFdatasync()
    monkeypatch.setattr(os, "fdatasync", gate)
    wal = Wal.open(tmp_path)
    called: list[tuple[int, object, int]] = []

    def waiter(lsn: int):
        return lambda error: called.append((lsn, error, wal.durable_lsn))

    first = wal.append(1, "a")
    wal.when_durable(first, waiter(first))
    await gate.wait_entered()  # the first flush holds "a" and is blocked in its fsync
    late = [wal.append(1, i) for i in range(5)]
    for lsn in late:
        wal.when_durable(lsn, waiter(lsn))
    await asyncio.sleep(0.05)
    assert called == []  # nothing is durable yet
    gate.release.set()
    for _ in range(200):
        if len(called) == 6:
            break
        await asyncio.sleep(0.01)
    assert [lsn for lsn, _, _ in called] == [first, *late]
    assert all(error is None and durable >= lsn for lsn, error, durable in called)
    assert gate.calls == 2  # the five late records shared one fsync
    await wal.close()


async def test_when_durable_hands_a_failed_fsync_to_every_waiter(tmp_path, monkeypatch):
    def failing(fd: int) -> None:
        raise OSError(errno.EIO, "simulated I/O error")

    monkeypatch.setattr(os, "fdatasync", failing)
    wal = Wal.open(tmp_path)
    errors: list = []
    for i in range(10):
        wal.when_durable(wal.append(1, i), errors.append)
    for _ in range(200):
        if len(errors) == 10:
            break
        await asyncio.sleep(0.01)
    assert len(errors) == 10 and all(isinstance(e, Unavailable) for e in errors)
    assert "wal write failed" in str(errors[0]) and wal.durable_lsn == 0
    with pytest.raises(Unavailable):  # a poisoned WAL refuses at once, calling nothing back
        wal.when_durable(wal.last_lsn, errors.append)
    assert len(errors) == 10
    await wal.close()


async def test_a_failing_durability_callback_does_not_strand_the_others(tmp_path, caplog):
    wal = Wal.open(tmp_path)
    called: list[int] = []

    def broken(error: object) -> None:
        raise RuntimeError("a broken caller")

    a = wal.append(1, "a")
    wal.when_durable(a, broken)
    b = wal.append(1, "b")
    wal.when_durable(b, lambda error: called.append(b))
    await wal.sync()
    await asyncio.sleep(0)
    assert called == [b]
    assert "durability callback failed" in caplog.text
    await wal.close()


async def test_when_durable_refuses_an_lsn_not_appended_and_a_closed_wal(tmp_path):
    wal = Wal.open(tmp_path)
    with pytest.raises(ValueError, match="last appended LSN is 0"):
        wal.when_durable(1, lambda error: None)
    lsn = wal.append(1, "x")
    await wal.close()
    with pytest.raises(Unavailable, match="closed"):
        wal.when_durable(lsn, lambda error: None)
