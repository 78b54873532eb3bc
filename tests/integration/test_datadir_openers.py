"""Every opener of a data directory takes its lock: the engine, each shard, the session journal.

A second open of a held directory — from this process too, since flock locks belong to
the open file — is refused with DataDirLocked before anything is read, and closing
lets it go (specs/engine.md, "Data directory layout").
"""

from __future__ import annotations

import os

import pytest

import oribus
from oribus.bus.session_journal import SessionJournal
from oribus.datadir_lock import DataDirLock
from oribus.hosts.embedded import EngineConfig
from oribus.hosts.up import UpHost
from oribus.shards.config import ShardConfig
from oribus.shards.shard import Shard


async def test_a_held_engine_directory_refuses_a_second_engine_and_its_shards_and_journal(data_dir):
    async with oribus.open_local(data_dir, shards=2, agent="a") as bus:
        await bus.put("k", 1)
        cfg = EngineConfig(data_dir=data_dir)
        for opening in (lambda: oribus.open_local(data_dir, agent="b")._open(),
                        lambda: Shard.open(cfg.shard_config(1)),
                        lambda: SessionJournal.open(cfg.session_journal_dir)):
            with pytest.raises(oribus.DataDirLocked) as refused:
                await opening()
            assert f"pid {os.getpid()}" in refused.value.message
    async with oribus.open_local(data_dir, agent="c") as bus:  # closed: free again
        assert (await bus.get("k")).value == 1


async def test_a_shard_lets_its_directory_go_on_close_and_on_a_failed_open(tmp_path):
    cfg = ShardConfig(shard_id=0, data_dir=tmp_path / "s0")
    shard = await Shard.open(cfg)
    with pytest.raises(oribus.DataDirLocked):
        DataDirLock.acquire(cfg.data_dir)
    await shard.close()
    DataDirLock.acquire(cfg.data_dir).release()
    (cfg.wal_dir / "0000000000000000-0000000000000001.wal").write_bytes(b"not a wal")
    with pytest.raises(oribus.DataCorrupted):
        await Shard.open(cfg)
    DataDirLock.acquire(cfg.data_dir).release()  # the failed open did not keep the lock


@pytest.mark.slow  # starts a shard process
async def test_up_processes_holds_the_top_directory_and_each_shard_process_its_own(tmp_path):
    cluster = UpHost(tmp_path / "data", listen="127.0.0.1:0", shards=1, processes=True)
    await cluster.start()
    try:
        with pytest.raises(oribus.DataDirLocked) as refused:
            DataDirLock.acquire(tmp_path / "data")
        assert refused.value.details["pid"] == os.getpid()
        with pytest.raises(oribus.DataDirLocked) as refused:  # the shard process's, not this one's
            DataDirLock.acquire(cluster.config.shard_config(0).data_dir)
        assert refused.value.details["pid"] == cluster.shard_procs[0].pid
    finally:
        await cluster.stop()
    DataDirLock.acquire(tmp_path / "data").release()  # stopped: free again
