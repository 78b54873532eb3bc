"""How a member reaches another member of its group: ``StreamPeer``, a ``Peer`` over the stream transport.

One ``StreamClient`` per peer, on the peer's stream listener (the address its member claim
in etcd carries), speaking ``oribus.v1.Replica`` (``oribus.rpc.replica_codec``). The
batches a primary sends in one loop turn leave as one frame, exactly as the bus's calls
to a shard do; a lost connection fails the calls in flight with ``Unavailable`` and the
next call connects again, so a member that restarts on the same address is reached again
without anyone noticing but the calls that were in flight.

Timeouts are short (``timeout``, default ``REPLICA_CALL_TIMEOUT``): a member that does not
answer in time is, to the primary, a member that did not acknowledge — the majority
decides without it — and to a candidate, a member that gave no promise.
"""

from __future__ import annotations

from typing import Any

from oribus.rpc.replica_codec import REPLICA_OPS, REPLICA_SERVICE, MemberStatus
from oribus.rpc.stream_client import StreamClient
from oribus.shards.replica.messages import AppendBatch, AppendReply, PromiseReply, SnapshotChunk
from oribus.tls import TlsConfig, client_ssl_context

REPLICA_CALL_TIMEOUT = 5.0  # seconds a replica call waits for its answer before Unavailable


class StreamPeer:
    """Member ``member_id`` of this group, at its stream listener ``address``.

    ``await peer.append(batch)``; every call may raise ``Unavailable``. ``await close()``
    when the peer leaves the group (or this member stops).
    """

    def __init__(self, member_id: int, address: str, *, tls: TlsConfig | None = None,
                 timeout: float = REPLICA_CALL_TIMEOUT) -> None:
        self.member_id = member_id
        self.address = address
        context = client_ssl_context(tls) if tls is not None else None
        server_name = tls.ssl_target_name_override if tls is not None else None
        self.client = StreamClient(address, REPLICA_SERVICE, ssl=context, server_hostname=server_name,
                                   timeout=timeout)

    async def _call(self, op: str, *params: Any) -> Any:
        return await self.client.call_op(REPLICA_OPS, op, *params)

    async def append(self, batch: AppendBatch) -> AppendReply:
        reply: AppendReply = await self._call("append", batch)
        return reply

    async def promise(self, term: int, candidate: int) -> PromiseReply:
        reply: PromiseReply = await self._call("promise", term, candidate)
        return reply

    async def install_snapshot(self, chunk: SnapshotChunk) -> AppendReply:
        reply: AppendReply = await self._call("install_snapshot", chunk)
        return reply

    async def status(self) -> MemberStatus:
        status: MemberStatus = await self._call("status")
        return status

    async def elect(self, term: int, candidate: int) -> bool:
        """Tell the member it holds the highest position of a majority: take over in ``term``."""
        return bool(await self._call("elect", term, candidate))

    async def close(self) -> None:
        await self.client.close()

    def __repr__(self) -> str:
        return f"StreamPeer({self.member_id}, {self.address!r})"
