"""``oribus up --processes --replicas 3`` as a process: a private etcd, supervised member processes.

It starts its own etcd (and says where), a group of three members per shard, and a bus that
follows the primaries; it says it is serving only once every member is a voter (one that
opened after the first term began is a learner until it has caught up), and then kill -9 of the primary with its data directory
deleted is survived — the supervisor starts the member again on an empty directory, it rejoins
as a learner and catches up — and SIGTERM stops every member and the etcd. Bad combinations are refused with
a clear error before anything starts. The members keep their older versions in LMDB
(``--history-store lmdb``): the new primary answers ``history`` from its own engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

from processes import ServerProcess, _alive, free_port, oribus_command, shard_pids

import oribus
from oribus import SessionExpired, Unavailable
from oribus.errors import OribusError
from oribus.meta.etcd import EtcdMeta
from oribus.meta.groups import EtcdGroups
from oribus.rpc.replica_client import StreamPeer
from oribus.rpc.replica_codec import MemberStatus


async def _group_state(url: str) -> tuple[int, int, dict[int, str]]:
    """(primary member, term, member -> stream address) of shard 0's group."""
    meta = EtcdMeta(url)
    try:
        groups = EtcdGroups(meta)
        primary = await groups.primary(0)
        members = {m: r.stream for m, r in (await groups.members(0)).items()}
        return (primary.member, primary.term, members) if primary is not None else (-1, 0, members)
    finally:
        await meta.close()


async def _statuses(url: str) -> dict[int, MemberStatus | None]:
    """Every member of shard 0's group as it answers ``status`` (None: it does not answer)."""
    _, _, members = await _group_state(url)
    out: dict[int, MemberStatus | None] = {}
    for member in range(3):
        out[member] = None
        if member in members:
            peer = StreamPeer(member, members[member], timeout=2.0)
            with contextlib.suppress(OribusError):
                out[member] = await peer.status()
            await peer.close()
    return out


def _logs(server: ServerProcess, data: Path) -> str:
    """``oribus up``'s log and the end of every member's (each process's log beside its directory)."""
    members = sorted((data / "groups" / "shard-0000").glob("member-*.log"))
    tails = ["\n".join(f.read_text(errors="replace").splitlines()[-30:]) for f in members]
    return "\n".join([server.log_tail(), *(f"==== {f.name}\n{t}" for f, t in zip(members, tails, strict=True))])


async def test_up_runs_supervised_replica_groups_on_a_private_etcd(cluster, tmp_path):
    data = tmp_path / "data"
    address = f"127.0.0.1:{free_port()}"
    server = cluster.add(ServerProcess("up", [
        "up", "--processes", "--replicas", "3", "--shards", "1", "--data-dir", str(data), "--listen", address,
        "--lease-ttl", "2", "--read-lease", "0.5", "--no-http", "--history-store", "lmdb"], tmp_path,
        address)).start()
    try:
        await asyncio.to_thread(server.wait_serving, 60)
        log = server.log_tail(50)
        url = re.search(r"started a private etcd at (http://\S+)", log)
        assert url is not None, log
        groups = json.loads(re.search(r"oribus up: groups (\{.*\})", log).group(1))  # type: ignore[union-attr]
        # serving only once every member is a voter: a member that opened after the group's first
        # term began (the three start at once; on a loaded machine one can be slow) is a learner on
        # its empty directory until it has caught up (specs/replication.md §7), and killing the
        # primary with its disk before that would leave one complete copy, which no group survives
        statuses = await _statuses(url.group(1))
        assert all(s is not None and s.voter for s in statuses.values()), f"{statuses}\n{_logs(server, data)}"
        pids = {m["member"]: m["pid"] for m in groups["0"]}
        assert sorted(pids) == [0, 1, 2] and sorted(shard_pids(data)) == sorted(pids.values())

        acked: dict[str, int] = {}
        async with oribus.connect(address, agent="writer") as w:
            for i in range(20):
                acked.update(await w.commit({f"u/{i}": i}))
            for i in (100, 200):
                acked.update(await w.commit({"u/0": i}))
            # every member was a voter when up said it was serving (see above), so the group
            # survives the loss of any one of them
            primary, term, _ = await _group_state(url.group(1))
            os.kill(pids[primary], signal.SIGKILL)
            shutil.rmtree(data / "groups" / "shard-0000" / f"member-{primary}")
            deadline = time.monotonic() + 30
            while True:  # a follower takes over; the same commit id while the outcome is unknown
                try:
                    acked.update(await w.commit({"u/after": 1}, commit_id="after-the-kill"))
                    break
                except Unavailable:
                    pass
                except SessionExpired:  # its own writes were deliveries on the dead primary
                    await w.reset_session()
                assert time.monotonic() < deadline, _logs(server, data)
                await asyncio.sleep(0.1)
            # the supervisor started the member again on an empty directory; it catches up
            deadline = time.monotonic() + 30
            while True:
                new_primary, new_term, members = await _group_state(url.group(1))
                status = None
                if primary in members:
                    peer = StreamPeer(primary, members[primary], timeout=2.0)
                    with contextlib.suppress(Unavailable):
                        status = await peer.status()
                    await peer.close()
                if status is not None and status.voter and status.last[0] == new_term:
                    break
                assert time.monotonic() < deadline, f"{status}\n{_logs(server, data)}"
                await asyncio.sleep(0.2)
            assert new_primary != primary and new_term > term
            assert "starting it again on an empty directory" in server.log_tail(200)
            got = await w.get_many(sorted(acked))
            assert {k: i.version for k, i in got.items()} == acked
            assert [(v.version, v.value) for v in await w.history("u/0")] == [(3, 200), (2, 100), (1, 0)]
            assert (data / "groups" / "shard-0000" / f"member-{new_primary}" / "history" / "data.mdb").exists()
    finally:
        code = server.stop()
        leftover = shard_pids(data)
        for pid in leftover:  # ours: they serve this test's data directory
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert code == 0, server.log_tail()
    assert leftover == [], "member processes outlived `oribus up`"
    etcd_pid = int(re.search(r"private etcd .* pid (\d+)\)", server.log_tail(400)).group(1))  # type: ignore[union-attr]
    assert not _alive(etcd_pid), "the private etcd outlived `oribus up`"


def test_up_refuses_replica_groups_it_cannot_run(tmp_path):
    def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(oribus_command("up", "--data-dir", str(tmp_path / "data"), "--listen",
                                             f"127.0.0.1:{free_port()}", "--no-http", *args),
                              capture_output=True, text=True, timeout=60, env=env)

    no_etcd = run("--processes", "--replicas", "3", env={**os.environ, "PATH": str(tmp_path / "nothing")})
    assert no_etcd.returncode != 0 and "install the etcd binary" in no_etcd.stderr, no_etcd.stderr
    not_processes = run("--replicas", "3")
    assert not_processes.returncode != 0 and "add --processes" in not_processes.stderr
    even = run("--processes", "--replicas", "2")
    assert even.returncode != 0 and "replicas must be one of 1, 3, 5" in even.stderr
    assert shard_pids(tmp_path / "data") == []
    assert not (tmp_path / "data" / "groups").exists()
