"""Damaged files on disk, through the public API and the ``oribus repair`` command.

The three recovery outcomes of the WAL (``oribus/shards/wal/reader.py``) seen
from the engine:

* a torn tail — the last record of a shard's log cut short, or zero bytes
  after it — is cut off at open, and every commit acknowledged before the
  cut record is there;
* a damaged record followed by valid ones refuses to open with
  ``oribus.DataCorrupted`` naming the file and the byte offset; ``oribus
  repair`` then keeps a ``.broken`` copy and truncates, after which the
  engine opens with every commit before the damage intact;
* a damaged snapshot refuses to open with ``DataCorrupted`` naming the file.

Each commit here is a one-key put with a known commit id, so each is exactly
one WAL record on its key's shard (its body's ``"i"`` is the commit id) and
the tests can tell which commits a damaged byte takes away.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import msgpack
import pytest

import oribus
from oribus.meta.slots import StaticSlotMap
from oribus.shards.manifest import ShardManifest, write_manifest
from oribus.shards.wal import HEADER_SIZE, decode_record, list_segments
from oribus.shards.wal.record import FrameStatus
from oribus.shards.wal.segment import SEGMENT_HEADER_SIZE
from oribus.shards.wal.snapshot import load_latest_snapshot, write_snapshot

SHARDS = 2


def _balanced_keys(per_shard: int) -> list[str]:
    """Keys spread evenly over the shards (similar names often hash to the same shard)."""
    slot_map = StaticSlotMap(SHARDS)
    by_shard: dict[int, list[str]] = {s: [] for s in range(SHARDS)}
    i = 0
    while min(len(v) for v in by_shard.values()) < per_shard:
        key = f"corrupt/key-{i}"
        if len(by_shard[slot_map.shard_for(key)]) < per_shard:
            by_shard[slot_map.shard_for(key)].append(key)
        i += 1
    return [k for group in zip(*by_shard.values(), strict=True) for k in group]


KEYS = _balanced_keys(4)  # alternating shards: commit i goes to shard i % SHARDS


@dataclass(frozen=True)
class Committed:
    commit_id: str
    key: str
    version: int


@dataclass(frozen=True)
class Frame:
    """One intact WAL record: where it is and which commit it holds."""

    path: Path
    offset: int
    end: int
    lsn: int
    commit_id: str


async def commit_puts(data: Path, count: int, start: int = 0, **options) -> list[Committed]:
    """``count`` acknowledged one-key puts, each with its own session and commit id."""
    done = []
    async with oribus.open_local(data, shards=SHARDS, agent="seed", **options) as bus:
        for i in range(start, start + count):
            cid = f"c{i:03d}"
            key = KEYS[i % len(KEYS)]
            versions = await bus.session(session_id=cid).commit({key: {"c": cid}}, commit_id=cid)
            done.append(Committed(cid, key, versions[key]))
    return done


def frames(wal_dir: Path) -> list[Frame]:
    """Every record of one shard's WAL, in log order."""
    found = []
    for segment in list_segments(wal_dir):
        data = segment.path.read_bytes()
        offset = SEGMENT_HEADER_SIZE
        while offset < len(data):
            d = decode_record(data, offset)
            assert d.status is FrameStatus.OK, f"{segment.path} is damaged at {offset} before the test"
            found.append(Frame(segment.path, offset, d.end, d.lsn, d.body["i"]))
            offset = d.end
    return found


def wal_dir(data: Path, shard: int) -> Path:
    return data / f"shard-{shard:04d}" / "wal"


def as_if_crashed(data: Path) -> None:
    """Leave each shard's MANIFEST as a crash before the clean close would: with the
    high-water mark the shard wrote when it opened the new directory (LSN 0). A torn
    tail is a write the crash interrupted, so the mark never covers it."""
    for shard in range(SHARDS):
        write_manifest(data / f"shard-{shard:04d}", ShardManifest(shard, 0))


def flip_byte(path: Path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0xFF
    path.write_bytes(bytes(raw))


async def present(data: Path, **options) -> set[str]:
    """Commit ids found in the history of every key, checking each key's versions run 1..n."""
    found: set[str] = set()
    async with oribus.open_local(data, shards=SHARDS, agent="check", **options) as bus:
        for key in KEYS:
            history = await bus.history(key)
            versions = [v.version for v in reversed(history)]
            assert versions == list(range(1, len(versions) + 1)), f"{key}: {versions}"
            found |= {v.commit_id for v in history}
            current = await bus.get(key)
            assert current.version == (history[0].version if history else 0)
    return found


def assert_all_present(commits: list[Committed], found: set[str]) -> None:
    missing = [c.commit_id for c in commits if c.commit_id not in found]
    assert not missing, f"acknowledged commits lost: {missing}"


def repair(data: Path, *options: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "oribus.cli", "repair", "--data-dir", str(data), *options],
        capture_output=True, text=True, timeout=60,
    )


# ---- torn tails ------------------------------------------------------------------

# How much of the last record is kept: bytes from its start, "half" of the body,
# or a negative count of bytes missing at its end.
CUTS = {
    "first-byte-only": 1,
    "header-cut-short": HEADER_SIZE - 1,
    "header-without-body": HEADER_SIZE,
    "half-body": "half",
    "last-byte-missing": -1,
}


@pytest.mark.parametrize("cut", list(CUTS.values()), ids=list(CUTS))
async def test_torn_last_record_is_cut_and_everything_before_it_survives(data_dir: Path, cut) -> None:
    commits = await commit_puts(data_dir, 30)
    as_if_crashed(data_dir)
    last = frames(wal_dir(data_dir, 0))[-1]
    size = last.end - last.offset
    keep = {"half": (HEADER_SIZE + size) // 2}.get(cut, cut)
    keep = keep if keep > 0 else size + keep
    assert 0 < keep < size
    with open(last.path, "r+b") as f:
        f.truncate(last.offset + keep)

    found = await present(data_dir)
    assert last.commit_id not in found, "the cut record cannot have been recovered"
    assert_all_present([c for c in commits if c.commit_id != last.commit_id], found)
    assert last.path.stat().st_size == last.offset, "the torn tail was not cut off"

    # the log goes on cleanly after the cut: new commits survive another reopen
    more = await commit_puts(data_dir, 10, start=100)
    assert_all_present(more, await present(data_dir))


@pytest.mark.parametrize("zeros", [1, 100, 4096])
async def test_zero_bytes_after_the_last_record_are_dropped(data_dir: Path, zeros: int) -> None:
    commits = await commit_puts(data_dir, 30)
    last = frames(wal_dir(data_dir, 1))[-1]
    with open(last.path, "ab") as f:
        f.write(bytes(zeros))
    assert_all_present(commits, await present(data_dir))
    assert last.path.stat().st_size == last.end
    more = await commit_puts(data_dir, 5, start=100)
    assert_all_present(commits + more, await present(data_dir))


async def test_torn_record_followed_by_zeros_is_a_torn_tail(data_dir: Path) -> None:
    commits = await commit_puts(data_dir, 30)
    as_if_crashed(data_dir)
    last = frames(wal_dir(data_dir, 0))[-1]
    with open(last.path, "r+b") as f:
        f.truncate(last.offset + HEADER_SIZE + 1)
        f.seek(0, 2)
        f.write(bytes(512))
    found = await present(data_dir)
    assert_all_present([c for c in commits if c.commit_id != last.commit_id], found)


# ---- damage in the middle of the log -------------------------------------------------


@pytest.mark.parametrize("where", ["last-segment", "earlier-segment"])
async def test_flipped_byte_is_refused_then_repaired(data_dir: Path, where: str) -> None:
    options = {"segment_bytes": 1024}  # several segments per shard
    commits = await commit_puts(data_dir, 60, **options)
    log = frames(wal_dir(data_dir, 0))
    segments = sorted({f.path for f in log})
    assert len(segments) >= 3, "the test needs several segments"
    in_segment = [f for f in log if f.path == (segments[-1] if where == "last-segment" else segments[1])]
    victim = in_segment[len(in_segment) // 2]
    assert victim is not log[-1], "the damaged record must be followed by valid records"
    flip_byte(victim.path, victim.offset + HEADER_SIZE + 2)  # a byte of the body: CRC mismatch

    with pytest.raises(oribus.DataCorrupted) as refused:
        await oribus.open_local(data_dir, shards=SHARDS, **options)
    message = str(refused.value)
    assert str(victim.path) in message and f"byte offset {victim.offset}" in message, message
    assert refused.value.details["offset"] == victim.offset
    # a refused open changes nothing: it refuses again the same way
    with pytest.raises(oribus.DataCorrupted, match=f"byte offset {victim.offset}"):
        await oribus.open_local(data_dir, shards=SHARDS, **options)

    done = repair(data_dir)
    assert done.returncode == 0, done.stderr
    assert victim.path.name in done.stdout
    broken = victim.path.with_name(victim.path.name + ".broken")
    assert broken.exists(), f"no .broken copy: {sorted(p.name for p in victim.path.parent.iterdir())}"
    assert broken.stat().st_size >= victim.end, "the .broken copy must hold the damaged record"
    assert victim.path.stat().st_size == victim.offset, "the log must end right before the damage"

    lost = {f.commit_id for f in log if f.lsn >= victim.lsn}
    kept = [c for c in commits if c.commit_id not in lost]
    found = await present(data_dir, **options)
    assert_all_present(kept, found)
    assert not (found & lost), f"records after the damage came back: {sorted(found & lost)}"
    assert len(kept) > len(commits) // 3

    # a second repair finds nothing to do, and the engine takes new commits
    again = repair(data_dir)
    assert again.returncode == 0 and "intact" in again.stdout, again.stdout
    more = await commit_puts(data_dir, 5, start=200, **options)
    assert_all_present(kept + more, await present(data_dir, **options))


@pytest.mark.parametrize("byte", [0, 8], ids=["magic", "first-lsn"])
async def test_flipped_segment_header_byte_is_repaired_keeping_every_record(data_dir: Path, byte: int) -> None:
    commits = await commit_puts(data_dir, 200)
    for shard in range(SHARDS):
        segments = list_segments(wal_dir(data_dir, shard))
        assert len(segments) == 1, "the scenario is a log of one segment per shard"
        flip_byte(segments[0].path, byte)
    with pytest.raises(oribus.DataCorrupted, match="segment"):
        await oribus.open_local(data_dir, shards=SHARDS)

    done = repair(data_dir, "--json")
    assert done.returncode == 0, done.stderr
    reports = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["wal_dir"] for r in reports] == [str(wal_dir(data_dir, s)) for s in range(SHARDS)]
    for r in reports:
        assert (r["kept"], r["dropped"], r["dropped_commit_ids"]) == (100, 0, []), r
        assert any("rewrote the header" in a for a in r["actions"]), r
    assert_all_present(commits, await present(data_dir))
    assert len(list(data_dir.rglob("*.wal.broken"))) == SHARDS, "the damaged files are kept"


async def test_repair_reports_the_commit_ids_of_the_records_it_drops(data_dir: Path) -> None:
    commits = await commit_puts(data_dir, 200)
    log = frames(wal_dir(data_dir, 0))
    victim = log[50]
    flip_byte(victim.path, victim.offset + HEADER_SIZE + 2)  # a byte of the body: CRC mismatch

    done = repair(data_dir)
    assert done.returncode == 0, done.stderr
    dropped = [f.commit_id for f in log[51:]]  # readable after the damage; the victim's is not
    summary = next(line for line in done.stdout.splitlines() if line.startswith(f"{wal_dir(data_dir, 0)}: kept"))
    assert f"kept 50 records (log ends at LSN {victim.lsn - 1}), dropped {len(log) - 50}" in summary, summary
    assert f"commit ids of the dropped records: {', '.join(dropped)}" in summary, summary
    assert "1 dropped records could not be read" in summary, summary
    assert done.stdout.splitlines()[-1] == f"{wal_dir(data_dir, 1)}: intact"

    lost = {f.commit_id for f in log[50:]}
    found = await present(data_dir)
    assert_all_present([c for c in commits if c.commit_id not in lost], found)
    assert not (found & lost)


async def test_repair_of_intact_data_changes_nothing(data_dir: Path) -> None:
    commits = await commit_puts(data_dir, 10)
    before = {p: p.read_bytes() for p in data_dir.rglob("*.wal")}
    done = repair(data_dir)
    assert done.returncode == 0, done.stderr
    assert [line.rsplit(": ", 1)[1] for line in done.stdout.splitlines()] == ["intact"] * SHARDS
    assert {p: p.read_bytes() for p in data_dir.rglob("*.wal")} == before
    assert not list(data_dir.rglob("*.broken*"))
    assert_all_present(commits, await present(data_dir))


# ---- damaged snapshots ----------------------------------------------------------------


def _flip_body(path: Path) -> None:
    flip_byte(path, path.stat().st_size - 3)


def _cut_short(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 5)


def _bad_magic(path: Path) -> None:
    flip_byte(path, 0)


@pytest.mark.parametrize("damage", [_flip_body, _cut_short, _bad_magic], ids=["flipped-body", "cut-short", "bad-magic"])
async def test_damaged_snapshot_is_refused_naming_the_file(data_dir: Path, damage) -> None:
    options = {"snapshot_every_records": 5}
    commits = await commit_puts(data_dir, 30, **options)
    snapshots = sorted((data_dir / "shard-0000" / "snapshots").glob("*.snap"))
    assert snapshots, "the workload should have written a snapshot"
    assert_all_present(commits, await present(data_dir, **options))  # intact, it opens

    damage(snapshots[-1])
    with pytest.raises(oribus.DataCorrupted) as refused:
        await oribus.open_local(data_dir, shards=SHARDS, **options)
    assert str(snapshots[-1]) in str(refused.value)
    assert refused.value.details["path"] == str(snapshots[-1])


def _store_from_a_newer_build(path: Path) -> None:
    """Rewrite the snapshot, intact (magic, length, CRC), with a store form this build does not know."""
    lsn = int(path.name.split("-")[1].split(".")[0], 16)
    _, raw = load_latest_snapshot(path.parent)
    state = msgpack.unpackb(raw, raw=False, strict_map_key=False)
    state["store"]["format"] = 99
    write_snapshot(path.parent, lsn, msgpack.packb(state, use_bin_type=True))  # as Shard.snapshot writes it


async def test_a_snapshot_in_a_store_format_from_a_newer_build_is_refused(data_dir: Path) -> None:
    options = {"snapshot_every_records": 5}
    await commit_puts(data_dir, 30, **options)
    snapshots = sorted((data_dir / "shard-0000" / "snapshots").glob("*.snap"))
    _store_from_a_newer_build(snapshots[-1])
    with pytest.raises(oribus.DataCorrupted, match="unknown store snapshot format 99") as refused:
        await oribus.open_local(data_dir, shards=SHARDS, **options)
    assert str(snapshots[-1].parent) in str(refused.value)
