"""The replica groups of a local ``oribus up --processes --replicas R``: who is where, who leads.

The nemesis of ``--start-local --replicas R`` (``oribus.verify.nemesis.GroupNemesis``) hits
members by role, so it must know, at the moment of each fault, every member process of
every group and which of them is primary. It learns this from the machine, not from a
banner printed once: member processes are restarted (``oribus up`` supervises them) and
change pids, and primaries change with every failover.

- **Members**: the live children of the ``oribus up`` process (``/proc/<pid>/stat``'s parent
  pid) whose command line is ``oribus shard --id N --member M``; that command line also
  names the member's data directory, its stream listener and the group's etcd.
- **Roles**: etcd's primary record for the shard (the member the buses follow) and each
  member's own ``status`` over the replica protocol (role, term, voter), on its stream
  listener.

A group is **healthy** when all its members run and answer as voters (none is catching up
as a learner) holding at least what the primary knows committed, and etcd's primary answers
as the primary of that term: only then may a
fault hit it without exceeding what the group is built to survive (any minority).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

from oribus.errors import OribusError
from oribus.meta.etcd import EtcdMeta
from oribus.meta.groups import EtcdGroups, PrimaryRecord
from oribus.rpc.replica_client import StreamPeer
from oribus.rpc.replica_codec import MemberStatus

STATUS_TIMEOUT = 2.0  # seconds a member has to answer ``status``


@dataclass(frozen=True)
class MemberProcess:
    """One member process as its command line describes it."""

    shard: int
    member: int
    pid: int
    data_dir: Path
    stream: str  # its stream listener (HOST:PORT or unix:PATH)
    etcd: str  # the group's etcd endpoints
    cluster: str

    @property
    def name(self) -> str:
        return f"shard {self.shard} member {self.member}"


def _flag(argv: list[str], name: str) -> str | None:
    for i, arg in enumerate(argv[:-1]):
        if arg == name:
            return argv[i + 1]
    return None


def parse_member(pid: int, argv: list[str]) -> MemberProcess | None:
    """The member an ``oribus shard --member`` command line runs (None: not one)."""
    if "shard" not in argv:
        return None
    shard, member, data_dir = _flag(argv, "--id"), _flag(argv, "--member"), _flag(argv, "--data-dir")
    stream, etcd = _flag(argv, "--stream-listen"), _flag(argv, "--etcd")
    if not (shard and member and data_dir and stream and etcd) or not (shard.isdigit() and member.isdigit()):
        return None
    return MemberProcess(int(shard), int(member), pid, Path(data_dir), stream, etcd,
                         _flag(argv, "--cluster") or "oribus")


def _parent_pid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # pid (comm) state ppid ...: comm may hold spaces and parentheses, so split after the last ')'
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] == "Z":  # exited, not yet reaped: not a member any more
        return None
    return int(fields[1])


def _argv(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def member_processes(parent: int) -> dict[tuple[int, int], MemberProcess]:
    """Every live member process that ``parent`` started, by (shard, member)."""
    found: dict[tuple[int, int], MemberProcess] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or _parent_pid(int(entry)) != parent:
            continue
        member = parse_member(int(entry), _argv(int(entry)))
        if member is not None:
            found[(member.shard, member.member)] = member
    return found


@dataclass(frozen=True)
class GroupView:
    """One group at one moment."""

    shard: int
    members: dict[int, MemberProcess]  # member id -> its live process
    statuses: dict[int, MemberStatus]  # member id -> what it answered (absent: no answer)
    primary: PrimaryRecord | None  # etcd's record

    def healthy(self, replicas: int) -> bool:
        if self.primary is None or len(self.members) < replicas or len(self.statuses) < replicas:
            return False
        if not all(s.voter and s.role in ("follower", "primary") for s in self.statuses.values()):
            return False
        leader = self.statuses.get(self.primary.member)
        if leader is None or leader.role != "primary" or leader.term != self.primary.term:
            return False
        # and none lags: each holds what the primary last knew committed
        return all(s.last[1] >= leader.commit_lsn for s in self.statuses.values())

    def primary_process(self) -> MemberProcess | None:
        return self.members.get(self.primary.member) if self.primary is not None else None

    def followers(self) -> list[MemberProcess]:
        leader = self.primary.member if self.primary is not None else -1
        return [p for m, p in sorted(self.members.items()) if m != leader]

    def describe(self) -> str:
        roles = ", ".join(f"{m}:{s.role}{'' if s.voter else '(learner)'}" for m, s in sorted(self.statuses.items()))
        leader = f"member {self.primary.member} term {self.primary.term}" if self.primary else "none"
        return f"shard {self.shard}: primary {leader}; members {roles or 'none answering'}"


class LocalGroups:
    """The groups of the ``oribus up`` process ``parent``: ``await view(shard)``; ``close()``."""

    def __init__(self, parent: int, shards: int, replicas: int) -> None:
        self.parent = parent
        self.shards = shards
        self.replicas = replicas
        self._meta: EtcdMeta | None = None

    def processes(self) -> dict[tuple[int, int], MemberProcess]:
        return member_processes(self.parent)

    async def view(self, shard: int) -> GroupView:
        members = {m: p for (s, m), p in self.processes().items() if s == shard}
        statuses = {}
        for m, p in members.items():
            status = await _status(p)
            if status is not None:
                statuses[m] = status
        primary = None
        if members:
            any_member = next(iter(members.values()))
            if self._meta is None:
                self._meta = EtcdMeta(any_member.etcd, any_member.cluster)
            with contextlib.suppress(OribusError, OSError):
                primary = await asyncio.wait_for(EtcdGroups(self._meta).primary(shard), STATUS_TIMEOUT)
        return GroupView(shard, members, statuses, primary)

    async def wait_healthy(self, shard: int, timeout: float) -> GroupView | None:
        """The group once healthy (``GroupView.healthy``); None if it is not within ``timeout``."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            view = await self.view(shard)
            if view.healthy(self.replicas):
                return view
            if asyncio.get_running_loop().time() > deadline:
                return None
            await asyncio.sleep(0.2)

    async def close(self) -> None:
        if self._meta is not None:
            await self._meta.close()
            self._meta = None


async def _status(p: MemberProcess) -> MemberStatus | None:
    peer = StreamPeer(p.member, p.stream, timeout=STATUS_TIMEOUT)
    try:
        return await asyncio.wait_for(peer.status(), STATUS_TIMEOUT)
    except (OribusError, OSError, TimeoutError):
        return None
    finally:
        await peer.close()
