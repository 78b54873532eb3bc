"""In-process peers: members of one group calling each other directly (tests, the simulation).

``DirectNetwork`` holds the members by id and the faults between them; ``network.peers(me)``
gives member ``me`` a ``DirectPeer`` for every other member, which calls the target's
``append`` / ``promise`` / ``install_snapshot`` as a stream connection would, and raises
``Unavailable`` where the network says the call or its reply is lost::

    net = DirectNetwork()
    for m in members:
        net.add(m)
    shard = await members[0].become_primary(1, net.peers(0))
    net.cut(0, 2)            # both directions; net.heal() restores every link
    net.isolate(1)           # cut from everyone
    net.drop_replies(0, 1)   # calls 0 -> 1 arrive, their replies are lost
    net.pause(2)             # calls to 2 wait until net.resume(2) (a SIGSTOPped process)

A member that is not in the network (closed, crashed: ``net.remove(id)``) is unreachable.
Every call yields to the event loop at least once (``delay`` seconds, default 0), so a call
is never answered synchronously.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from oribus.errors import Unavailable
from oribus.shards.replica.messages import AppendBatch, AppendReply, PromiseReply, SnapshotChunk

if TYPE_CHECKING:
    from oribus.shards.replica.member import ReplicaMember


class DirectNetwork:
    """Members by id and the faults between them (module docstring)."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.members: dict[int, ReplicaMember] = {}
        self._cut: set[tuple[int, int]] = set()  # (from, to): calls from -> to are lost
        self._reply_lost: set[tuple[int, int]] = set()  # (from, to): replies to -> from are lost
        self._paused: dict[int, asyncio.Event] = {}
        self.calls = 0

    def add(self, member: ReplicaMember) -> None:
        self.members[member.member_id] = member

    def remove(self, member_id: int) -> None:
        self.members.pop(member_id, None)

    def peers(self, me: int, ids: list[int] | None = None) -> list[DirectPeer]:
        """A peer for every other member (of ``ids``, default: the members added so far)."""
        ids = sorted(self.members) if ids is None else ids
        return [DirectPeer(self, me, i) for i in ids if i != me]

    def cut(self, a: int, b: int) -> None:
        self._cut |= {(a, b), (b, a)}

    def cut_one_way(self, source: int, target: int) -> None:
        self._cut.add((source, target))

    def isolate(self, member_id: int) -> None:
        for other in range(64):
            if other != member_id:
                self.cut(member_id, other)

    def drop_replies(self, source: int, target: int) -> None:
        self._reply_lost.add((source, target))

    def heal(self) -> None:
        self._cut.clear()
        self._reply_lost.clear()

    def pause(self, member_id: int) -> None:
        self._paused.setdefault(member_id, asyncio.Event())

    def resume(self, member_id: int) -> None:
        event = self._paused.pop(member_id, None)
        if event is not None:
            event.set()

    async def call(self, source: int, target: int, method: str, *args: Any) -> Any:
        self.calls += 1
        await asyncio.sleep(self.delay)
        if (source, target) in self._cut:
            raise Unavailable(f"member {target} is unreachable from member {source} (cut)")
        paused = self._paused.get(target)
        if paused is not None:
            await paused.wait()
        member = self.members.get(target)
        if member is None:
            raise Unavailable(f"member {target} is down")
        reply = await getattr(member, method)(*args)
        if (source, target) in self._reply_lost or (target, source) in self._cut:
            raise Unavailable(f"the reply of member {target} to member {source} was lost")
        return reply


class DirectPeer:
    """Member ``target`` as member ``source`` reaches it through a ``DirectNetwork``: a ``Peer``."""

    def __init__(self, network: DirectNetwork, source: int, target: int) -> None:
        self.network = network
        self.source = source
        self.member_id = target

    async def append(self, batch: AppendBatch) -> AppendReply:
        reply: AppendReply = await self.network.call(self.source, self.member_id, "append", batch)
        return reply

    async def promise(self, term: int, candidate: int) -> PromiseReply:
        reply: PromiseReply = await self.network.call(self.source, self.member_id, "promise", term, candidate)
        return reply

    async def install_snapshot(self, chunk: SnapshotChunk) -> AppendReply:
        reply: AppendReply = await self.network.call(self.source, self.member_id, "install_snapshot", chunk)
        return reply

    def __repr__(self) -> str:
        return f"DirectPeer({self.source} -> {self.member_id})"
