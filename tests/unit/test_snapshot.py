"""Shard snapshot files (oribus/shards/wal/snapshot.py)."""

from __future__ import annotations

import struct

import pytest
from crc32c import crc32c

from oribus import failpoints
from oribus.errors import DataCorrupted
from oribus.failpoints import FailpointHit
from oribus.shards.wal import Wal, WalConfig, load_latest_snapshot, snapshot_name, write_snapshot

STATE = {
    "keys": {"key-1": {"v": 3, "val": b"\x00\x01"}, "key-2": {"v": 1, "val": b""}},
    "history": {"key-1": [[1, b"a"], [2, b"b"], [3, b"\x00\x01"]]},
    7: "int key",
}


@pytest.fixture(autouse=True)
def _disarm_failpoints():
    yield
    failpoints.disarm()


def test_round_trip(tmp_path):
    path = write_snapshot(tmp_path, 42, STATE)
    assert path == tmp_path / "snapshot-000000000000002a.snap"
    assert path.name == snapshot_name(42)
    assert load_latest_snapshot(tmp_path) == (42, STATE)


def test_layout_matches_the_documented_format(tmp_path):
    path = write_snapshot(tmp_path, 0x0102, ["state"])
    data = path.read_bytes()
    magic, lsn, length, crc = struct.unpack_from("<8sQQI", data, 0)
    assert magic == b"ORISNAP1"
    assert lsn == 0x0102
    assert length == len(data) - 28
    assert crc == crc32c(data[28:])


def test_no_snapshot(tmp_path):
    assert load_latest_snapshot(tmp_path) is None
    assert load_latest_snapshot(tmp_path / "missing") is None


def test_newer_snapshot_replaces_older_ones(tmp_path):
    write_snapshot(tmp_path, 10, "ten")
    write_snapshot(tmp_path, 20, "twenty")
    assert sorted(p.name for p in tmp_path.iterdir()) == [snapshot_name(20)]
    assert load_latest_snapshot(tmp_path) == (20, "twenty")


def test_latest_snapshot_wins_over_a_leftover_older_one(tmp_path):
    write_snapshot(tmp_path, 20, "twenty")
    (tmp_path / snapshot_name(5)).write_bytes(b"an old file that came back after a crash")
    assert load_latest_snapshot(tmp_path) == (20, "twenty")


def damage_flip_body(data: bytearray) -> None:
    data[-3] ^= 0x10


def damage_truncate(data: bytearray) -> None:
    del data[-5:]


def damage_short_header(data: bytearray) -> None:
    del data[20:]


def damage_magic(data: bytearray) -> None:
    data[0] ^= 0xFF


def damage_header_lsn(data: bytearray) -> None:
    data[8] ^= 0x01


def damage_extra_bytes(data: bytearray) -> None:
    data.extend(b"junk")


@pytest.mark.parametrize(
    "damage",
    [
        damage_flip_body,
        damage_truncate,
        damage_short_header,
        damage_magic,
        damage_header_lsn,
        damage_extra_bytes,
    ],
)
def test_damaged_latest_snapshot_is_detected(tmp_path, damage):
    path = write_snapshot(tmp_path, 9, STATE)
    data = bytearray(path.read_bytes())
    damage(data)
    path.write_bytes(bytes(data))
    with pytest.raises(DataCorrupted) as excinfo:
        load_latest_snapshot(tmp_path)
    assert str(path) in str(excinfo.value)
    assert excinfo.value.details["path"] == str(path)


def test_leftover_temp_file_is_ignored_and_removed(tmp_path):
    write_snapshot(tmp_path, 10, "ten")
    temp = tmp_path / (snapshot_name(30) + ".tmp")
    temp.write_bytes(b"ORISNAP1 half written")
    assert load_latest_snapshot(tmp_path) == (10, "ten")
    assert not temp.exists()


def test_crash_before_rename_keeps_the_previous_snapshot(tmp_path):
    write_snapshot(tmp_path, 10, "ten")
    failpoints.arm("snapshot.before_rename", "raise")
    with pytest.raises(FailpointHit):
        write_snapshot(tmp_path, 20, "twenty")
    failpoints.disarm()
    assert (tmp_path / (snapshot_name(20) + ".tmp")).exists()
    assert load_latest_snapshot(tmp_path) == (10, "ten")
    assert sorted(p.name for p in tmp_path.iterdir()) == [snapshot_name(10)]


def test_crash_after_rename_has_the_new_snapshot(tmp_path):
    write_snapshot(tmp_path, 10, "ten")
    failpoints.arm("snapshot.after_rename", "raise")
    with pytest.raises(FailpointHit):
        write_snapshot(tmp_path, 20, "twenty")
    failpoints.disarm()
    assert load_latest_snapshot(tmp_path) == (20, "twenty")


async def test_snapshot_then_truncate_the_log_then_recover(tmp_path):
    wal_dir, snap_dir = tmp_path / "wal", tmp_path / "snap"
    state: dict[str, int] = {}
    wal = Wal.open(wal_dir, WalConfig(segment_bytes=256))
    for i in range(1, 101):
        wal.append(1, {"k": f"key-{i % 10}", "v": i})
        await wal.sync()
        state[f"key-{i % 10}"] = i
        if i == 60:
            write_snapshot(snap_dir, 60, state)
            removed = wal.remove_segments_before(61)
            assert removed > 0
    await wal.close()

    lsn, restored = load_latest_snapshot(snap_dir)
    assert lsn == 60

    def apply(record_lsn: int, rtype: int, body: dict) -> None:
        restored[body["k"]] = body["v"]

    wal = Wal.open(wal_dir, replay_from_lsn=lsn + 1, on_record=apply)
    assert restored == state
    assert wal.last_lsn == 100
    await wal.close()
