"""What a replica group needs of the WAL (writer.py, "Replica groups"): the batches a flush
takes, frames received from a primary, cutting a divergent tail, reading frames back."""

from __future__ import annotations

import collections

import pytest

from oribus.errors import Unavailable
from oribus.shards.wal import Wal, WalConfig, list_segments
from oribus.shards.wal.record import TERM_START, encode_record, split_frames


async def filled(path, count: int, **config) -> Wal:
    wal = Wal.open(path, WalConfig(**config))
    for i in range(count):
        wal.append(1, {"i": i})
        if i % 3 == 2:
            await wal.sync()
    await wal.sync()
    return wal


async def read_back(path) -> list:
    got: list = []
    wal = Wal.open(path, on_record=lambda lsn, rtype, body: got.append((lsn, rtype, body)))
    await wal.close()
    return got


async def test_on_batch_sees_every_flushed_batch_in_order(tmp_path) -> None:
    wal = Wal.open(tmp_path)
    seen: list[tuple[int, list[bytes]]] = []
    wal.on_batch = lambda first, frames: seen.append((first, list(frames)))
    for i in range(5):
        wal.append(1, {"i": i})
    await wal.sync()
    wal.append(2, {"i": 5})
    await wal.sync()
    await wal.close()
    assert [(first, len(frames)) for first, frames in seen] == [(1, 5), (6, 1)]
    frames = split_frames(b"".join(seen[0][1] + seen[1][1]), 1)
    assert [f.lsn for f in frames] == [1, 2, 3, 4, 5, 6] and frames[-1].body == {"i": 5}


async def test_frames_from_a_primary_are_written_unchanged_and_replay(tmp_path) -> None:
    primary = await filled(tmp_path / "p", 7)
    data, last, _ = primary.read_frames(1)
    assert last == 7
    follower = Wal.open(tmp_path / "f")
    assert follower.append_frames(data) == [(lsn, 1) for lsn in range(1, 8)]
    await follower.sync()
    assert follower.durable_lsn == 7
    await follower.close()
    await primary.close()
    assert list_segments(tmp_path / "f")[0].path.read_bytes()[16:] == data
    assert await read_back(tmp_path / "f") == await read_back(tmp_path / "p")


async def test_damaged_or_misnumbered_frames_are_refused_whole(tmp_path) -> None:
    wal = await filled(tmp_path, 2)
    good = encode_record(1, 3, {"a": 1}) + encode_record(1, 4, {"a": 2})
    damaged = bytearray(good)
    damaged[-1] ^= 0xFF
    for bad in (bytes(damaged), encode_record(1, 4, {}), good[:-3], good + b"\0"):
        with pytest.raises(ValueError):
            wal.append_frames(bad)
        assert wal.last_lsn == 2  # nothing buffered
    wal.append_frames(good)
    await wal.sync()
    await wal.close()
    assert [lsn for lsn, _, _ in await read_back(tmp_path)] == [1, 2, 3, 4]


async def test_truncate_after_cuts_the_tail_across_segments(tmp_path) -> None:
    wal = await filled(tmp_path, 40, segment_bytes=200)
    assert len(list_segments(tmp_path)) > 3
    assert await wal.truncate_after(12) == 28
    assert wal.last_lsn == wal.durable_lsn == 12
    wal.append(TERM_START, {"t": 2, "m": 0})
    wal.append(1, {"i": "new"})
    await wal.sync()
    await wal.close()
    got = await read_back(tmp_path)
    assert [lsn for lsn, _, _ in got] == list(range(1, 15))
    assert got[12] == (13, TERM_START, {"t": 2, "m": 0}) and got[13][2] == {"i": "new"}


async def test_truncate_drops_buffered_frames_too_and_not_below_the_log(tmp_path) -> None:
    wal = await filled(tmp_path, 5)
    wal.append(1, {"i": "buffered"})
    assert await wal.truncate_after(5) == 1
    assert wal.last_lsn == 5
    assert await wal.truncate_after(9) == 0
    assert await wal.truncate_after(0) == 5
    await wal.close()
    assert await read_back(tmp_path) == []


async def test_truncate_fails_waiters_for_removed_records(tmp_path) -> None:
    wal = await filled(tmp_path, 3)
    lsn = wal.append(1, {"i": 3})
    wal.append(1, {"i": 4})
    errors: list = []
    # a waiter for a record about to be cut, placed as when_durable leaves it while a flush runs
    wal._durable_waiters = collections.deque([(lsn + 1, errors.append)])
    await wal.truncate_after(lsn - 1)
    assert len(errors) == 1 and isinstance(errors[0], Unavailable)
    await wal.close()


async def test_read_frames_pages_by_bytes_and_refuses_what_a_snapshot_covers(tmp_path) -> None:
    wal = await filled(tmp_path, 30, segment_bytes=150)
    one = len(encode_record(1, 1, {"i": 0}))
    data, last, _ = wal.read_frames(5, max_bytes=3 * one)
    assert last == 7 and [f.lsn for f in split_frames(data, 5)] == [5, 6, 7]
    data, last, _ = wal.read_frames(5, max_bytes=1)  # at least one frame
    assert last == 5
    data, last, _ = wal.read_frames(20, upto_lsn=24)
    assert last == 24 and len(split_frames(data, 20)) == 5
    assert wal.read_frames(31)[:2] == (b"", 30)
    wal.roll()
    wal.append(1, {"i": 30})
    await wal.sync()
    wal.remove_segments_before(20)
    assert wal.first_lsn > 1
    with pytest.raises(ValueError):
        wal.read_frames(1)
    data, last, _ = wal.read_frames(wal.first_lsn)
    assert last == 31
    await wal.close()


async def test_reading_on_from_a_cursor_gives_the_log_in_order(tmp_path) -> None:
    wal = await filled(tmp_path, 200, segment_bytes=1000)
    expected = wal.read_frames(1, max_bytes=1 << 30).data
    parts, nxt, cursor = [], 1, None
    while nxt <= wal.last_lsn:
        data, last, cursor = wal.read_frames(nxt, max_bytes=170, cursor=cursor)
        assert last >= nxt and cursor.lsn == last + 1
        parts.append(data)
        nxt = last + 1
    assert b"".join(parts) == expected
    assert [f.lsn for f in split_frames(expected, 1)] == list(range(1, 201))
    # a stale cursor (another LSN) is not trusted
    data, last, _ = wal.read_frames(3, max_bytes=1, cursor=cursor)
    assert last == 3 and split_frames(data, 3)[0].lsn == 3
    await wal.close()
