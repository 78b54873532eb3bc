"""A client that goes away in the middle of its commit: what the server says is what it keeps.

The client sends a commit on a raw stream and cancels the RPC while the shard
waits for the fsync (a failpoint makes that wait long). The commit's outcome is
unknown to that client, so either outcome is allowed — but the server must keep
to ONE: the state it serves before a restart must be the state it recovers.
Another client then commits the same key and is acknowledged; after a restart
its write must still be there.
"""

from __future__ import annotations

import asyncio

import msgpack
from grpc import aio
from processes import up

import oribus
from oribus.rpc import wire


async def test_commit_cancelled_by_a_disconnecting_client_is_not_resurrected(cluster, tmp_path):
    server = cluster.add(up(tmp_path, tmp_path / "data", processes=False))
    server.env = {"ORIBUS_FAILPOINTS": "wal.before_fsync=sleep:0.4"}
    server.start()
    await asyncio.to_thread(server.wait_serving)
    key = "disconnect/doc"

    async with aio.insecure_channel(server.address) as channel:
        call = channel.stream_stream(wire.method_path(wire.BUS_SERVICE, wire.STREAM))()
        ghost = {
            "s": ["ghost", "g1"],
            "id": "ghost-1",
            "w": {key: msgpack.packb("ghost")},
            "ct": True,
        }
        await call.write(msgpack.packb([[1, "commit", ghost]], use_bin_type=True))
        await asyncio.sleep(0.15)  # the commit is appended and waits for its fsync
        call.cancel()  # the client vanishes

    async with oribus.connect(server.address, agent="writer") as writer:
        acked = await writer.commit({key: "acknowledged"}, commit_id="acked-1")
        before = await writer.get(key)
        history_before = [(h.version, h.value, h.commit_id) for h in await writer.history(key)]
    assert before.value == "acknowledged" and before.version == acked[key]

    server.stop()  # a clean shutdown: everything acknowledged is on disk
    server.env = {}
    server.start()
    await asyncio.to_thread(server.wait_serving)
    async with oribus.connect(server.address, agent="reader") as reader:
        after = await reader.get(key)
        history_after = [(h.version, h.value, h.commit_id) for h in await reader.history(key)]
    assert after == before, f"the restart changed {key}: {before} -> {after}"
    assert history_after == history_before
