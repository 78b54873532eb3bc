"""An acknowledged two-phase commit names the new version of every key it wrote.

Layout: two ``oribus shard`` processes and an ``oribus bus`` over them. Shard 1,
a participant that is not the primary, is armed to kill itself (SIGKILL) when the
commit's finish reaches it — after it voted YES, before it answers. The commit is
decided at the primary, so the client is told it committed; the answer must still
carry shard 1's key with its new version (it used to hold only the primary's keys).
Once shard 1 is back, the write is applied there and a retry of the same commit id
answers the same versions.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from conftest import keys_on_shard
from processes import two_shards_and_a_bus

import oribus

pytestmark = pytest.mark.slow


async def test_commit_acknowledged_while_a_participant_dies_reports_all_versions(cluster, tmp_path):
    s0, s1, b = await asyncio.to_thread(two_shards_and_a_bus, cluster, tmp_path, "txn.before_participant_commit=kill")

    ctr = keys_on_shard(0, "ctr")[0]  # the smallest written key: shard 0 is the primary
    row = keys_on_shard(1, "u/1")[0]
    session = oribus.connect(b.address, agent="writer")
    try:
        versions = await session.commit({ctr: 1, row: "x"}, commit_id="full-1")
        assert await asyncio.to_thread(s1.wait_exit) == -9, "the failpoint did not fire"
        assert versions == {ctr: 1, row: 1}

        s1.env = {}
        s1.start()
        await asyncio.to_thread(s1.wait_serving)
        reader = session.session(agent="reader")
        deadline = time.monotonic() + 30
        while True:  # shard 1 resolves the prepared commit through the primary
            try:
                item = await reader.get(row)
                if item.version == 1:
                    break
            except oribus.Unavailable:
                pass
            assert time.monotonic() < deadline, "shard 1 never applied the committed write"
            await asyncio.sleep(0.2)
        assert item.value == "x"
        assert await session.commit({ctr: 1, row: "x"}, commit_id="full-1") == {ctr: 1, row: 1}
    finally:
        await session.close()
