"""WAL recovery (reader.py) and offline repair (repair.py).

Each test builds a real log with ``Wal``, damages the files the way a crash
or a bad disk would, and checks which of the three recovery outcomes
(clean end, torn tail, corruption) the scan reaches.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from oribus.errors import DataCorrupted
from oribus.shards.wal import (
    SEGMENT_HEADER_SIZE,
    SEGMENT_MAGIC,
    Wal,
    WalConfig,
    decode_record,
    encode_record,
    list_segments,
    parse_segment_name,
    repair_wal,
    segment_name,
)
from oribus.shards.wal.record import FrameStatus
from oribus.shards.wal.segment import encode_segment_header


def body_of(lsn: int) -> dict:
    return {"n": lsn, "pad": "p" * (lsn % 7), "bin": bytes([lsn % 256])}


def type_of(lsn: int) -> int:
    return 1 + lsn % 3


async def build_log(path: Path, count: int, *, segment_bytes: int = 512, batch: int = 5) -> list:
    """A log of ``count`` records written in batches of ``batch``; returns its segments."""
    wal = Wal.open(path, WalConfig(segment_bytes=segment_bytes))
    for i in range(count):
        lsn = wal.append(type_of(i + 1), body_of(i + 1))
        assert lsn == i + 1
        if i % batch == batch - 1:
            await wal.sync()
    await wal.close()
    return list_segments(path)


def replay(path: Path, **kwargs) -> tuple[Wal, list]:
    got: list = []
    wal = Wal.open(
        path, on_record=lambda lsn, rtype, body: got.append((lsn, rtype, body)), **kwargs
    )
    return wal, got


def expected(first: int, last: int) -> list:
    return [(lsn, type_of(lsn), body_of(lsn)) for lsn in range(first, last + 1)]


def frames_of(path: Path) -> list[tuple[int, int, int]]:
    """``(offset, end, lsn)`` of each intact frame in a segment file."""
    data = path.read_bytes()
    offset, frames = SEGMENT_HEADER_SIZE, []
    while offset < len(data):
        decoded = decode_record(data, offset)
        assert decoded.status is FrameStatus.OK
        frames.append((offset, decoded.end, decoded.lsn))
        offset = decoded.end
    return frames


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x5A
    path.write_bytes(bytes(data))


def assert_corruption(excinfo, path: Path, offset: int) -> None:
    err = excinfo.value
    assert str(path) in str(err)
    assert f"byte offset {offset}" in str(err)
    assert err.details["path"] == str(path)
    assert err.details["offset"] == offset


# -- clean end -------------------------------------------------------------------


async def test_round_trip_across_several_segments(tmp_path):
    segments = await build_log(tmp_path, 200)
    assert len(segments) >= 5

    wal, got = replay(tmp_path)
    assert got == expected(1, 200)
    assert wal.last_lsn == wal.durable_lsn == 200
    assert wal.append(1, "after reopen") == 201
    await wal.sync()
    await wal.close()

    wal, got = replay(tmp_path)
    assert got[-1] == (201, 1, "after reopen")
    assert len(got) == 201
    await wal.close()


async def test_segment_files_are_named_and_headed_as_documented(tmp_path):
    segments = await build_log(tmp_path, 100)
    for position, segment in enumerate(segments):
        seq, first_lsn = parse_segment_name(segment.name)
        assert segment.name == segment_name(seq, first_lsn)
        assert seq == position
        data = segment.path.read_bytes()
        assert data[:8] == SEGMENT_MAGIC
        assert int.from_bytes(data[8:16], "little") == first_lsn
        assert frames_of(segment.path)[0][2] == first_lsn


async def test_replay_from_lsn_filters_records(tmp_path):
    await build_log(tmp_path, 120)
    wal, got = replay(tmp_path, replay_from_lsn=57)
    assert got == expected(57, 120)
    assert wal.last_lsn == 120
    await wal.close()


async def test_segments_below_replay_from_lsn_are_not_read(tmp_path):
    segments = await build_log(tmp_path, 120)
    offset = frames_of(segments[0].path)[1][0]
    flip(segments[0].path, offset + 20)
    replay_from = segments[2].first_lsn

    wal, got = replay(tmp_path, replay_from_lsn=replay_from)
    assert got == expected(replay_from, 120)
    await wal.close()
    with pytest.raises(DataCorrupted) as excinfo:
        Wal.open(tmp_path)
    assert_corruption(excinfo, segments[0].path, offset)


async def test_empty_directory_starts_at_replay_from_lsn(tmp_path):
    wal = Wal.open(tmp_path / "new", replay_from_lsn=50)
    assert wal.last_lsn == wal.durable_lsn == 49
    assert wal.append(1, "x") == 50
    await wal.close()
    wal, got = replay(tmp_path / "new", replay_from_lsn=50)
    assert got == [(50, 1, "x")]
    await wal.close()


async def test_snapshot_ahead_of_the_log_replaces_the_log(tmp_path):
    old = await build_log(tmp_path, 20)
    wal, got = replay(tmp_path, replay_from_lsn=31)
    assert got == []
    assert wal.last_lsn == 30
    assert wal.append(1, "x") == 31
    await wal.close()
    assert not any(segment.path.exists() for segment in old)
    wal, got = replay(tmp_path, replay_from_lsn=31)
    assert got == [(31, 1, "x")]
    await wal.close()


async def test_log_that_starts_after_replay_from_lsn_is_corrupt(tmp_path):
    segments = await build_log(tmp_path, 60)
    segments[0].path.unlink()
    with pytest.raises(DataCorrupted, match="log starts at LSN"):
        Wal.open(tmp_path)


async def test_interrupted_segment_creation_is_removed(tmp_path):
    await build_log(tmp_path, 10)
    temp = tmp_path / (segment_name(99, 11) + ".tmp")
    temp.write_bytes(SEGMENT_MAGIC[:5])
    wal, got = replay(tmp_path)
    assert got == expected(1, 10)
    assert not temp.exists()
    await wal.close()


# -- torn tail -------------------------------------------------------------------


def cut_mid_header(path: Path, start: int, end: int) -> None:
    os.truncate(path, start + 5)


def cut_mid_body(path: Path, start: int, end: int) -> None:
    os.truncate(path, end - 3)


def cut_after_type_byte(path: Path, start: int, end: int) -> None:
    os.truncate(path, start + 9)


def zero_the_record(path: Path, start: int, end: int) -> None:
    with open(path, "r+b") as f:
        f.seek(start)
        f.write(bytes(end - start))


def damage_at_eof(path: Path, start: int, end: int) -> None:
    flip(path, end - 2)  # bad CRC, nothing after it


def damage_then_zeros(path: Path, start: int, end: int) -> None:
    flip(path, start + 20)
    with open(path, "ab") as f:
        f.write(bytes(4096))


def zero_the_body(path: Path, start: int, end: int) -> None:
    # The filesystem extended the file but the page with this body never
    # reached the disk: the header is intact, the body reads back as zeros.
    with open(path, "r+b") as f:
        f.seek(start + 17)
        f.write(bytes(end - start - 17))


@pytest.mark.parametrize(
    "damage",
    [
        cut_mid_header,
        cut_after_type_byte,
        cut_mid_body,
        zero_the_record,
        damage_at_eof,
        damage_then_zeros,
        zero_the_body,
    ],
)
async def test_torn_tail_is_truncated_and_appending_resumes(tmp_path, caplog, damage):
    segments = await build_log(tmp_path, 50)
    last = segments[-1].path
    start, end, lsn = frames_of(last)[-1]
    assert lsn == 50
    damage(last, start, end)

    with caplog.at_level(logging.WARNING, logger="oribus.wal"):
        wal, got = replay(tmp_path)
    assert got == expected(1, 49)
    assert last.stat().st_size == start
    assert any("torn tail" in r.message and str(last) in r.message for r in caplog.records)
    assert wal.last_lsn == 49
    assert wal.append(2, "replacement") == 50
    await wal.sync()
    await wal.close()

    wal, got = replay(tmp_path)
    assert got == expected(1, 49) + [(50, 2, "replacement")]
    await wal.close()


async def test_trailing_zeros_after_the_last_record_are_removed(tmp_path, caplog):
    segments = await build_log(tmp_path, 30)
    last = segments[-1].path
    size = last.stat().st_size
    with open(last, "ab") as f:
        f.write(bytes(8192))
    with caplog.at_level(logging.WARNING, logger="oribus.wal"):
        wal, got = replay(tmp_path)
    assert got == expected(1, 30)
    assert last.stat().st_size == size
    assert "torn tail" in caplog.text
    await wal.close()


async def test_empty_last_segment_is_a_clean_end(tmp_path):
    wal = Wal.open(tmp_path, WalConfig(segment_bytes=256))
    for i in range(20):
        wal.append(type_of(i + 1), body_of(i + 1))
        wal.sync_now()
    await wal.close()
    # A segment created (header only) just before a crash.
    segments = list_segments(tmp_path)
    fresh = tmp_path / segment_name(segments[-1].seq + 1, 21)
    fresh.write_bytes(encode_segment_header(21))
    wal, got = replay(tmp_path)
    assert got == expected(1, 20)
    assert wal.append(1, "x") == 21
    await wal.close()
    assert frames_of(fresh)[0][2] == 21


# -- corruption ------------------------------------------------------------------


async def test_bad_record_in_a_middle_segment_is_corruption(tmp_path):
    segments = await build_log(tmp_path, 100)
    target = segments[1].path
    start, _, _ = frames_of(target)[2]
    flip(target, start + 19)
    before = {s.path: s.path.read_bytes() for s in segments}

    with pytest.raises(DataCorrupted) as excinfo:
        Wal.open(tmp_path)
    assert_corruption(excinfo, target, start)
    assert "CRC mismatch" in str(excinfo.value)
    assert {s.path: s.path.read_bytes() for s in segments} == before  # nothing modified


async def test_truncated_middle_segment_is_corruption(tmp_path):
    segments = await build_log(tmp_path, 100)
    target = segments[1].path
    start, end, _ = frames_of(target)[-1]
    os.truncate(target, end - 4)
    with pytest.raises(DataCorrupted) as excinfo:
        Wal.open(tmp_path)
    assert_corruption(excinfo, target, start)


async def test_zeroed_record_in_a_middle_segment_is_corruption(tmp_path):
    segments = await build_log(tmp_path, 100)
    target = segments[2].path
    frames = frames_of(target)
    start = frames[-2][0]
    with open(target, "r+b") as f:
        f.seek(start)
        f.write(bytes(os.path.getsize(target) - start))
    with pytest.raises(DataCorrupted) as excinfo:
        Wal.open(tmp_path)
    assert_corruption(excinfo, target, start)


async def test_bad_record_followed_by_a_valid_one_in_the_last_segment(tmp_path):
    segments = await build_log(tmp_path, 50)
    last = segments[-1].path
    frames = frames_of(last)
    assert len(frames) >= 2
    start = frames[-2][0]
    flip(last, start + 18)
    size = last.stat().st_size
    with pytest.raises(DataCorrupted) as excinfo:
        Wal.open(tmp_path)
    assert_corruption(excinfo, last, start)
    assert last.stat().st_size == size


async def test_bad_record_followed_by_garbage_in_the_last_segment(tmp_path):
    segments = await build_log(tmp_path, 50)
    last = segments[-1].path
    start = frames_of(last)[-1][0]
    flip(last, start + 18)
    with open(last, "ab") as f:
        f.write(b"\x00\x00\x07garbage")
    with pytest.raises(DataCorrupted) as excinfo:
        Wal.open(tmp_path)
    assert_corruption(excinfo, last, start)


async def test_damaged_length_that_hides_later_records_is_corruption(tmp_path):
    # A flipped high bit in a length field makes a record in the middle of
    # the last segment appear to run past EOF, which alone would look torn.
    segments = await build_log(tmp_path, 50)
    last = segments[-1].path
    frames = frames_of(last)
    start = frames[-3][0]
    flip(last, start + 2)  # third byte of the u32 length: + ~5 MiB
    with pytest.raises(DataCorrupted) as excinfo:
        Wal.open(tmp_path)
    assert_corruption(excinfo, last, start)


@pytest.mark.parametrize("which", [0, 2, -1])
async def test_bad_segment_magic_is_corruption(tmp_path, which):
    segments = await build_log(tmp_path, 60)
    target = segments[which].path
    flip(target, 3)
    with pytest.raises(DataCorrupted) as excinfo:
        Wal.open(tmp_path)
    assert_corruption(excinfo, target, 0)
    assert "magic" in str(excinfo.value)


async def test_segment_header_disagreeing_with_its_name_is_corruption(tmp_path):
    segments = await build_log(tmp_path, 60)
    target = segments[1].path
    with open(target, "r+b") as f:
        f.seek(8)
        f.write((segments[1].first_lsn + 1).to_bytes(8, "little"))
    with pytest.raises(DataCorrupted) as excinfo:
        Wal.open(tmp_path)
    assert_corruption(excinfo, target, 0)


async def test_short_segment_header_is_corruption(tmp_path):
    segments = await build_log(tmp_path, 60)
    os.truncate(segments[-1].path, 7)
    with pytest.raises(DataCorrupted) as excinfo:
        Wal.open(tmp_path)
    assert_corruption(excinfo, segments[-1].path, 0)


async def test_missing_middle_segment_is_corruption(tmp_path):
    segments = await build_log(tmp_path, 100)
    segments[2].path.unlink()
    with pytest.raises(DataCorrupted) as excinfo:
        Wal.open(tmp_path)
    assert_corruption(excinfo, segments[3].path, 0)
    assert "missing" in str(excinfo.value)


def write_segment(directory: Path, seq: int, first_lsn: int, lsns: list[int]) -> Path:
    path = directory / segment_name(seq, first_lsn)
    frames = b"".join(encode_record(1, lsn, body_of(lsn)) for lsn in lsns)
    path.write_bytes(encode_segment_header(first_lsn) + frames)
    return path


@pytest.mark.parametrize("lsns", [[1, 2, 4, 5], [1, 2, 2, 3], [1, 2, 1]])
def test_non_consecutive_lsn_inside_a_segment_is_corruption(tmp_path, lsns):
    path = write_segment(tmp_path, 0, 1, lsns)
    start = frames_of(path)[2][0]
    with pytest.raises(DataCorrupted, match="LSN gap") as excinfo:
        Wal.open(tmp_path)
    assert_corruption(excinfo, path, start)


def test_lsn_gap_between_segments_is_corruption(tmp_path):
    write_segment(tmp_path, 0, 1, [1, 2, 3])
    second = write_segment(tmp_path, 1, 5, [5, 6])
    with pytest.raises(DataCorrupted, match="LSN gap") as excinfo:
        Wal.open(tmp_path)
    assert_corruption(excinfo, second, 0)


def test_overlapping_segments_are_corruption(tmp_path):
    write_segment(tmp_path, 0, 1, [1, 2, 3])
    second = write_segment(tmp_path, 1, 3, [3, 4])
    with pytest.raises(DataCorrupted) as excinfo:
        Wal.open(tmp_path)
    assert_corruption(excinfo, second, 0)


def test_on_record_errors_propagate(tmp_path):
    write_segment(tmp_path, 0, 1, [1, 2, 3])

    def on_record(lsn, rtype, body):
        if lsn == 2:
            raise RuntimeError("apply failed")

    with pytest.raises(RuntimeError, match="apply failed"):
        Wal.open(tmp_path, on_record=on_record)


# -- repair ----------------------------------------------------------------------


def snapshot_files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


async def test_repair_leaves_an_intact_log_alone(tmp_path):
    await build_log(tmp_path, 80)
    before = snapshot_files(tmp_path)
    assert repair_wal(tmp_path).actions == []
    assert snapshot_files(tmp_path) == before


async def test_repair_truncates_at_the_damage_and_keeps_broken_copies(tmp_path):
    segments = await build_log(tmp_path, 150)
    assert len(segments) >= 6
    target = segments[2].path
    frames = frames_of(target)
    start, _, first_lost = frames[3]
    flip(target, start + 20)
    damaged_bytes = target.read_bytes()
    later = {s.path.name: s.path.read_bytes() for s in segments[3:]}
    with pytest.raises(DataCorrupted):
        Wal.open(tmp_path)

    actions = repair_wal(tmp_path).actions
    assert any(target.name in a and "copied" in a for a in actions)
    assert any(f"byte offset {start}" in a and "truncated" in a for a in actions)
    assert len(actions) == 2 + len(later)
    assert (tmp_path / (target.name + ".broken")).read_bytes() == damaged_bytes
    assert target.stat().st_size == start
    for name, data in later.items():
        assert not (tmp_path / name).exists()
        assert (tmp_path / (name + ".broken")).read_bytes() == data

    wal, got = replay(tmp_path)
    assert got == expected(1, first_lost - 1)
    assert wal.append(1, "after repair") == first_lost
    await wal.close()
    assert repair_wal(tmp_path).actions == []


@pytest.mark.parametrize("byte", [0, 7, 8, 15], ids=["magic-first", "magic-last", "lsn-first", "lsn-last"])
async def test_repair_rewrites_a_damaged_segment_header_and_keeps_every_record(tmp_path, byte):
    segments = await build_log(tmp_path, 100)
    target = segments[3]
    flip(target.path, byte)
    damaged = target.path.read_bytes()
    with pytest.raises(DataCorrupted):
        Wal.open(tmp_path)

    report = repair_wal(tmp_path)
    assert report.actions[0].startswith(f"rewrote the header of {target.name}"), report.actions
    assert len(report.actions) == 1, "nothing after the header is given up"
    assert (report.kept, report.dropped, report.last_lsn) == (100, 0, 100)
    assert (tmp_path / (target.name + ".broken")).read_bytes() == damaged
    assert target.path.read_bytes()[:SEGMENT_HEADER_SIZE] == encode_segment_header(target.first_lsn)
    wal, got = replay(tmp_path)
    assert got == expected(1, 100)
    await wal.close()
    assert repair_wal(tmp_path).actions == []


async def test_repair_moves_a_segment_whose_header_and_first_record_are_damaged(tmp_path):
    segments = await build_log(tmp_path, 100)
    target = segments[3]
    flip(target.path, 0)
    flip(target.path, SEGMENT_HEADER_SIZE + 20)  # nothing left to prove where the segment starts
    report = repair_wal(tmp_path)
    assert report.actions[0].startswith(f"moved {target.name} to {target.name}.broken")
    assert not target.path.exists()
    assert report.last_lsn == target.first_lsn - 1 and report.kept == target.first_lsn - 1
    # every later record is dropped and reported; all but the damaged one are still readable
    assert report.dropped == 100 - report.last_lsn
    assert report.unreadable == [target.first_lsn]
    assert [(r.lsn, r.rtype, r.body) for r in report.found] == expected(target.first_lsn + 1, 100)
    wal, got = replay(tmp_path)
    assert got == expected(1, target.first_lsn - 1)
    await wal.close()


async def test_repair_after_a_missing_segment_reports_its_records_as_unreadable(tmp_path):
    segments = await build_log(tmp_path, 100)
    gone = segments[2]
    gone.path.unlink()
    report = repair_wal(tmp_path)
    assert report.last_lsn == gone.first_lsn - 1 and report.dropped == 100 - report.last_lsn
    assert report.unreadable == list(range(gone.first_lsn, segments[3].first_lsn))
    assert [r.lsn for r in report.found] == list(range(segments[3].first_lsn, 101))
    wal, got = replay(tmp_path)
    assert got == expected(1, gone.first_lsn - 1)
    await wal.close()


async def test_repair_reports_the_records_it_cuts_from_the_middle_of_a_segment(tmp_path):
    segments = await build_log(tmp_path, 100)
    target = segments[2].path
    start, _, lost = frames_of(target)[2]
    flip(target, start + 1)  # the length field: the frame no longer ends where it did
    report = repair_wal(tmp_path)
    assert (report.last_lsn, report.kept, report.dropped) == (lost - 1, lost - 1, 100 - lost + 1)
    assert report.unreadable == [lost]
    assert [r.lsn for r in report.found] == list(range(lost + 1, 101))
    wal, got = replay(tmp_path)
    assert got == expected(1, lost - 1)
    await wal.close()


async def test_repair_does_not_overwrite_earlier_broken_files(tmp_path):
    segments = await build_log(tmp_path, 40)
    last = segments[-1].path
    (tmp_path / (last.name + ".broken")).write_bytes(b"from an earlier repair")
    flip(last, frames_of(last)[0][0] + 19)
    actions = repair_wal(tmp_path).actions
    assert any(f"{last.name}.broken.1" in a for a in actions)
    assert (tmp_path / (last.name + ".broken")).read_bytes() == b"from an earlier repair"
    wal, got = replay(tmp_path)
    assert got == expected(1, segments[-1].first_lsn - 1)
    await wal.close()
