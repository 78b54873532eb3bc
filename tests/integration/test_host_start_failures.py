"""A host whose start-up fails half-way stops exactly what it had started: no lock held, no
port open, no task or shard process left running (oribus/hosts/lifecycle.py, ``Teardown``).

Each test lets a host start some of its parts, makes the next one fail the way it does in
production — a shard whose WAL is damaged, a port some other process holds, etcd gone
before the bus is announced — and then checks that everything started before is stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e.processes import shard_pids

import oribus
from oribus.datadir_lock import DataDirLock
from oribus.errors import Unavailable
from oribus.gateway import GatewayConfig, HttpGateway
from oribus.hosts.bus import BusHost
from oribus.hosts.embedded import EmbeddedEngine, EngineConfig
from oribus.hosts.shard import run_shard_server
from oribus.hosts.up import UpHost
from oribus.meta.cluster_meta import BusRecord, ShardClaim, StaticMeta
from oribus.rpc.shard_server import ShardServer
from oribus.shards.config import ShardConfig
from oribus.shards.wal import list_segments


def held(directory: Path) -> bool:
    """Is ``directory``'s lock held (by this process or another)?"""
    try:
        DataDirLock.acquire(directory, create=False).release()
    except oribus.DataDirLocked:
        return True
    return False


def engine_locks(data: Path, shards: int) -> list[Path]:
    cfg = EngineConfig(data_dir=data, shards=shards)
    return [data, *(cfg.shard_config(i).data_dir for i in range(shards)), cfg.session_journal_dir]


@contextlib.contextmanager
def taken_port() -> Iterator[int]:
    """A port another socket listens on, as another process's would."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def refused(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except ConnectionRefusedError:
        return True
    writer.close()
    return False


def other_tasks() -> set[asyncio.Task]:
    """Tasks running oribus code (a sweep, a watch, a client's stream), except this test's.
    gRPC's own tasks are left out: an in-process server renews them per call."""
    def ours(task: asyncio.Task) -> bool:
        code = getattr(task.get_coro(), "cr_code", None)
        return code is not None and f"{os.sep}oribus{os.sep}" in code.co_filename
    return {t for t in asyncio.all_tasks() if t is not asyncio.current_task() and ours(t)}


async def tasks_left(before: set[asyncio.Task], seconds: float = 5.0) -> set[asyncio.Task]:
    """The tasks started since ``before`` that have not ended within ``seconds``. A server in
    this process (the shard a bus talked to) ends its side of a closed stream a little after
    the client closed it; a task the failed start leaked never ends."""
    deadline = asyncio.get_running_loop().time() + seconds
    while (left := other_tasks() - before) and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)
    return left


async def damage_shard(data: Path, shard_id: int, shards: int) -> None:
    """A data directory whose shard ``shard_id`` has a WAL segment that is not a WAL."""
    engine = await EmbeddedEngine.open(EngineConfig(data_dir=data, shards=shards))
    await engine.close()
    wal_dir = EngineConfig(data_dir=data, shards=shards).shard_config(shard_id).wal_dir
    segments = list_segments(wal_dir)
    assert segments, "the shard wrote no segment to damage"
    for segment in segments:
        segment.path.write_bytes(b"not a wal")


async def test_embedded_engine_whose_second_shard_is_damaged_keeps_no_lock(data_dir):
    await damage_shard(data_dir, 1, shards=2)
    before = other_tasks()
    with pytest.raises(oribus.DataCorrupted):  # after DATA/LOCK and shard 0 were opened
        await EmbeddedEngine.open(EngineConfig(data_dir=data_dir))
    assert [p for p in engine_locks(data_dir, 2) if held(p)] == []
    assert not await tasks_left(before)


async def test_up_whose_grpc_port_is_taken_stops_its_engine_and_http_gateway(data_dir):
    http_port = free_port()
    before = other_tasks()
    with taken_port() as grpc_port:
        up = UpHost(data_dir, listen=f"127.0.0.1:{grpc_port}", shards=2,
                    http=GatewayConfig(listen=f"127.0.0.1:{http_port}"))
        with pytest.raises((OSError, RuntimeError), match="bind|listen"):  # the engine and HTTP had started
            await up.start()
    assert await refused(http_port), "the HTTP gateway outlived a failed start"
    assert [p for p in engine_locks(data_dir, 2) if held(p)] == []
    assert not await tasks_left(before)
    await up.stop()  # a stop after the failed start does nothing


async def test_up_whose_gateway_fails_to_stop_still_closes_its_engine(data_dir, monkeypatch, caplog):
    real_stop = HttpGateway.stop

    async def stop_then_fail(self: HttpGateway) -> None:
        await real_stop(self)
        raise RuntimeError("gateway stop failed")

    monkeypatch.setattr(HttpGateway, "stop", stop_then_fail)
    with taken_port() as grpc_port:
        up = UpHost(data_dir, listen=f"127.0.0.1:{grpc_port}",
                    http=GatewayConfig(listen="127.0.0.1:0"))
        with pytest.raises((OSError, RuntimeError), match="bind|listen"):  # the start's error, not the stop's
            await up.start()
    assert [p for p in engine_locks(data_dir, 1) if held(p)] == []
    assert any("HTTP gateway" in r.getMessage() and "gateway stop failed" in r.getMessage()
               for r in caplog.records)


@pytest.mark.slow  # starts shard processes
async def test_up_processes_whose_second_shard_process_fails_stops_the_first(data_dir):
    await damage_shard(data_dir, 1, shards=2)
    up = UpHost(data_dir, listen="127.0.0.1:0", shards=2, processes=True)
    spawned = []
    spawn = up.spawn_shard

    def spawn_and_note(shard_id: int, listen: str = "127.0.0.1:0"):
        proc = spawn(shard_id, listen)
        spawned.append(proc)
        return proc

    up.spawn_shard = spawn_and_note  # type: ignore[method-assign]
    try:
        with pytest.raises(Unavailable, match="shard 1 process exited"):  # shard 0 was serving
            await up.start()
        assert len(spawned) == 2 and spawned[1].returncode not in (None, 0)
        assert spawned[0].poll() is not None, "shard 0's process outlived the failed start"
        assert shard_pids(data_dir) == []
        assert [p for p in engine_locks(data_dir, 2)[:3] if held(p)] == []  # DATA and each shard's
    finally:
        for proc in spawned:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


class EtcdGone(StaticMeta):
    """Static shards, and a metadata store that is unreachable by the time the bus announces itself."""

    async def register_bus(self, record: BusRecord) -> None:
        raise Unavailable("etcd: connection refused")


async def test_bus_host_that_cannot_announce_itself_stops_serving(tmp_path):
    shard = ShardServer(ShardConfig(shard_id=0, data_dir=tmp_path / "shard"), "127.0.0.1:0")
    await shard.start()
    try:
        grpc_port, http_port = free_port(), free_port()
        before = other_tasks()
        bus = BusHost(EtcdGone([shard.address]), tmp_path / "bus", f"127.0.0.1:{grpc_port}",
                      http=GatewayConfig(listen=f"127.0.0.1:{http_port}"))
        with pytest.raises(Unavailable, match="etcd"):  # after the journal, directory, HTTP and gRPC
            await bus.start()
        assert await refused(grpc_port), "the gRPC server outlived a failed start"
        assert await refused(http_port), "the HTTP gateway outlived a failed start"
        assert not held(tmp_path / "bus" / "sessions")
        assert not await tasks_left(before)  # the directory's watch, its shard clients, the sweep
    finally:
        await shard.stop()


class Claims(StaticMeta):
    """A metadata store that grants claims and notes which were released."""

    def __init__(self, addresses: list[str]) -> None:
        super().__init__(addresses)
        self.claimed: list[ShardClaim] = []
        self.released: list[ShardClaim] = []

    async def claim_shard(self, shard_id: int, address: str, stream: str = "") -> ShardClaim:
        claim = ShardClaim(shard_id, 7)
        self.claimed.append(claim)
        return claim

    async def release(self, claim: ShardClaim) -> None:
        self.released.append(claim)


async def test_shard_whose_port_is_taken_releases_its_claim_and_its_directory(tmp_path):
    meta = Claims(["unused:0"])
    loop = asyncio.get_running_loop()
    try:
        with taken_port() as port, pytest.raises((OSError, RuntimeError), match="bind|listen"):
            await run_shard_server(0, tmp_path / "shard", f"127.0.0.1:{port}", meta=meta)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):  # run_shard_server listens for them
            loop.remove_signal_handler(sig)
    assert len(meta.claimed) == 1 and meta.released == meta.claimed
    assert not held(tmp_path / "shard")
