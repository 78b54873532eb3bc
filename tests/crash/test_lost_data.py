"""Files that are gone, not damaged: a deleted WAL segment, a deleted shard directory.

A WAL directory with nothing in it reads like a new shard, so without more
knowledge an engine whose shard lost its log would open with an empty store
and say nothing. Each shard keeps a MANIFEST with its id and a high-water
mark (specs/engine.md): the open refuses with ``DataCorrupted`` naming what
is missing, unless ``unsafe_allow_empty`` (``--allow-empty``) says to start
from what is left, which logs a WARNING.

Each commit is a one-key put with its own commit id, one WAL record each.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import oribus
from oribus.errors import InvalidRequest
from oribus.shards.config import ShardConfig
from oribus.shards.repair import repair_shard
from oribus.shards.shard import Shard
from oribus.shards.wal import list_segments

COMMITS = 200


async def commit_puts(data: Path, count: int = COMMITS, start: int = 0, **options) -> None:
    async with oribus.open_local(data, agent="seed", **options) as bus:
        for i in range(start, start + count):
            cid = f"c{i:03d}"
            await bus.session(session_id=cid).commit({f"lost/key-{i}": {"c": cid}}, commit_id=cid)


async def count_present(data: Path, count: int = COMMITS, **options) -> int:
    async with oribus.open_local(data, agent="check", **options) as bus:
        items = await bus.get_many([f"lost/key-{i}" for i in range(count)])
    return sum(1 for item in items.values() if item.value is not None)


async def test_deleting_the_only_wal_segment_is_refused_naming_it(data_dir: Path, caplog) -> None:
    await commit_puts(data_dir)
    wal = data_dir / "shard-0000" / "wal"
    segments = list_segments(wal)
    assert len(segments) == 1, "the scenario is a log of one segment"
    segments[0].path.unlink()

    for _ in range(2):  # a refused open changes nothing: it refuses again the same way
        with pytest.raises(oribus.DataCorrupted) as refused:
            await oribus.open_local(data_dir)
        message = str(refused.value)
        assert str(wal) in message and "no WAL segment" in message, message
        assert refused.value.details["expected_lsn"] == COMMITS
        assert refused.value.details["found_lsn"] == 0
        assert "--allow-empty" in message
        assert list_segments(wal) == [], "the refused open created a segment"

    with caplog.at_level(logging.WARNING, logger="oribus.shard"):
        assert await count_present(data_dir, unsafe_allow_empty=True) == 0
    assert any("data is missing" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    # the manifest now says the shard starts over: it opens without the override, and keeps new commits
    await commit_puts(data_dir, 10, start=COMMITS)
    assert await count_present(data_dir, COMMITS + 10) == 10


async def test_deleting_the_last_of_several_segments_is_refused(data_dir: Path) -> None:
    options = {"segment_bytes": 2048}
    await commit_puts(data_dir, **options)
    wal = data_dir / "shard-0000" / "wal"
    segments = list_segments(wal)
    assert len(segments) >= 3
    segments[-1].path.unlink()
    with pytest.raises(oribus.DataCorrupted) as refused:
        await oribus.open_local(data_dir, **options)
    assert refused.value.details["expected_lsn"] == COMMITS
    assert refused.value.details["found_lsn"] == segments[-1].first_lsn - 1
    assert segments[-2].name in str(refused.value)


async def test_deleting_the_shard_directory_is_refused_naming_it(data_dir: Path, caplog) -> None:
    await commit_puts(data_dir)
    shard_dir = data_dir / "shard-0000"
    shutil.rmtree(shard_dir)

    with pytest.raises(oribus.DataCorrupted) as refused:
        await oribus.open_local(data_dir)
    assert str(shard_dir) in str(refused.value) and "missing" in str(refused.value)
    assert not shard_dir.exists(), "the refused open recreated the shard directory"

    with caplog.at_level(logging.WARNING, logger="oribus.engine"):
        assert await count_present(data_dir, unsafe_allow_empty=True) == 0
    assert any(str(shard_dir) in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    assert await count_present(data_dir) == 0  # started over: it opens from here on


async def test_emptied_shard_directory_is_refused(data_dir: Path) -> None:
    await commit_puts(data_dir, 20)
    shard_dir = data_dir / "shard-0000"
    shutil.rmtree(shard_dir)
    shard_dir.mkdir()
    with pytest.raises(oribus.DataCorrupted, match="holds no MANIFEST, WAL segment or snapshot"):
        await oribus.open_local(data_dir)


async def test_shard_opened_as_another_shard_is_refused(data_dir: Path) -> None:
    await commit_puts(data_dir, 5)
    with pytest.raises(InvalidRequest, match="holds the data of shard 0"):
        await Shard.open(ShardConfig(shard_id=1, data_dir=data_dir / "shard-0000"))


async def test_new_and_older_data_directories_still_open(data_dir: Path) -> None:
    assert await count_present(data_dir) == 0  # a new directory opens empty
    await commit_puts(data_dir, 30)
    # a data directory written before shards kept a MANIFEST: it opens, and gains one
    manifest = data_dir / "shard-0000" / "MANIFEST"
    manifest.unlink()
    assert await count_present(data_dir, 30) == 30
    assert manifest.exists()
    assert '"durable_lsn": 30' in manifest.read_text()


async def test_the_mark_rises_with_new_segments_and_snapshots_before_any_close(data_dir: Path) -> None:
    """A crash skips the clean close, so the mark must already cover most of the log."""
    manifest = data_dir / "shard-0000" / "MANIFEST"

    def mark() -> int:
        return json.loads(manifest.read_text())["durable_lsn"]

    async with oribus.open_local(data_dir, agent="seed", segment_bytes=2048) as bus:
        for i in range(COMMITS):
            await bus.session(session_id=f"s{i}").commit({f"lost/key-{i}": i}, commit_id=f"c{i:03d}")
        segments = list_segments(data_dir / "shard-0000" / "wal")
        assert len(segments) >= 3
        assert mark() == segments[-1].first_lsn - 1, "the mark follows the last new segment"
    assert mark() == COMMITS, "a clean close raises the mark to the end of the log"

    async with oribus.open_local(data_dir / "other", agent="seed", snapshot_every_records=50) as bus:
        for i in range(100):  # the last snapshot comes after the last commit: no new segment follows it
            await bus.session(session_id=f"s{i}").commit({f"lost/key-{i}": i}, commit_id=f"c{i:03d}")
        other = data_dir / "other" / "shard-0000" / "MANIFEST"
        for _ in range(100):  # snapshots are written in the background
            if json.loads(other.read_text())["durable_lsn"] >= 100:
                break
            await asyncio.sleep(0.05)
        assert json.loads(other.read_text())["durable_lsn"] >= 100, "the mark follows the snapshots"


async def test_repair_accepts_the_loss_of_a_last_segment_and_reports_it(data_dir: Path) -> None:
    options = {"segment_bytes": 2048}
    await commit_puts(data_dir, **options)
    segments = list_segments(data_dir / "shard-0000" / "wal")
    segments[-1].path.unlink()
    kept = segments[-1].first_lsn - 1

    report = repair_shard(data_dir / "shard-0000")
    assert (report.wal.kept, report.dropped, report.missing) == (kept, COMMITS - kept, COMMITS - kept)
    assert any(f"from LSN {COMMITS} to {kept}" in a for a in report.actions), report.actions
    assert f"dropped {COMMITS - kept}" in report.summary()
    assert await count_present(data_dir, **options) == kept


_CHILD = """
import asyncio, sys
import oribus

async def main(data):
    async with oribus.open_local(data, agent="seed", segment_bytes=2048) as bus:
        for i in range(200):
            cid = f"c{i:03d}"
            await bus.session(session_id=cid).commit({f"lost/key-{i}": {"c": cid}}, commit_id=cid)
            print(cid, flush=True)

asyncio.run(main(sys.argv[1]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("hit", [1, 3])
async def test_kill_while_replacing_the_manifest_loses_nothing(data_dir: Path, hit: int) -> None:
    env = {**os.environ, "ORIBUS_FAILPOINTS": f"manifest.before_rename=kill@{hit}"}
    child = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-c", _CHILD, str(data_dir)],
        capture_output=True, text=True, timeout=60, env=env,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr
    acknowledged = child.stdout.split()
    async with oribus.open_local(data_dir, agent="check", segment_bytes=2048) as bus:
        items = await bus.get_many([f"lost/key-{i}" for i in range(len(acknowledged))])
    assert [item.value["c"] for item in items.values()] == acknowledged
