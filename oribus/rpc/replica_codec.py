"""The operations of ``oribus.v1.Replica`` (member → member of one replica group): ``REPLICA_OPS``.

The messages are those of ``oribus.shards.replica.messages`` (``specs/replication.md`` §3,
§5, §7); they travel over the stream transport (``oribus.rpc.frames``) on the shard
process's one stream listener, beside the bus's ``oribus.v1.Shard`` (the hello names the
service). A primary's batches to one member are calls on one connection: the batches of
one loop turn leave in one frame, as the bus's calls do.

Shapes (msgpack; a position is ``[term, lsn]``)::

    append            {"t": term, "p": primary, "pv": [term, lsn], "f": frames (bin),
                       "l": last_lsn, "c": commit_lsn}
                      -> [ok, term, durable_lsn, [term, lsn], needs_snapshot, voter]
    promise           {"t": term, "c": candidate}
                      -> [granted, term, voter, [term, lsn]]
    install_snapshot  {"t": term, "p": primary, "l": lsn, "lt": last_term, "o": offset,
                       "d": data (bin), "z": done}
                      -> as append
    status            {} -> {"member", "role", "term", "voter", "last": [term, lsn], ...}
                      (what an election and ``oribus up`` ask a member: ``MemberStatus``)
    elect             {"t": term, "c": candidate}
                      -> true: the member tries to take over in ``term`` (a candidate that
                      found it holds the highest position tells it so, §5 rule 3)

Every value is checked on decoding: a malformed call is an ``InvalidRequest`` and
changes nothing on the member.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from oribus.errors import InvalidRequest
from oribus.rpc.wire import Op, need, opt, same
from oribus.shards.replica.messages import (
    AppendBatch,
    AppendReply,
    Position,
    PromiseReply,
    SnapshotChunk,
)

REPLICA_SERVICE = "oribus.v1.Replica"


def _count(v: Any, what: str) -> int:
    """A non-negative int (a term, an LSN, a member id, an offset)."""
    if type(v) is not int or v < 0:
        raise InvalidRequest(f"{what} must be an integer >= 0, not {v!r:.40}")
    return v


def enc_position(p: Position) -> list:
    return [p[0], p[1]]


def dec_position(v: Any, what: str = "position") -> Position:
    if not isinstance(v, list | tuple) or len(v) != 2:
        raise InvalidRequest(f"{what} must be [term, lsn]")
    return (_count(v[0], f"{what} term"), _count(v[1], f"{what} lsn"))


def enc_batch(b: AppendBatch) -> dict:
    return {"t": b.term, "p": b.primary, "pv": enc_position(b.prev), "f": b.frames, "l": b.last_lsn,
            "c": b.commit_lsn}


def dec_batch(a: Any) -> tuple[AppendBatch]:
    prev = dec_position(need(a, "pv", list), "prev")
    frames = need(a, "f", bytes)
    last = _count(need(a, "l", int), "last_lsn")
    if last < prev[1] or (last == prev[1]) != (not frames):
        raise InvalidRequest("last_lsn must follow prev, and only an empty batch ends at prev")
    return (AppendBatch(_count(need(a, "t", int), "term"), _count(need(a, "p", int), "primary"), prev,
                        frames, last, _count(need(a, "c", int), "commit_lsn")),)


def enc_append_reply(r: AppendReply) -> list:
    return [r.ok, r.term, r.durable_lsn, enc_position(r.last), r.needs_snapshot, r.voter]


def dec_append_reply(v: Any) -> AppendReply:
    ok, term, durable, last, needs, voter = v
    return AppendReply(bool(ok), int(term), int(durable), dec_position(last), bool(needs), bool(voter))


def dec_promise_args(a: Any) -> tuple[int, int]:
    return _count(need(a, "t", int), "term"), _count(need(a, "c", int), "candidate")


def enc_promise_reply(r: PromiseReply) -> list:
    return [r.granted, r.term, r.voter, enc_position(r.last)]


def dec_promise_reply(v: Any) -> PromiseReply:
    granted, term, voter, last = v
    return PromiseReply(bool(granted), int(term), bool(voter), dec_position(last))


def enc_chunk(c: SnapshotChunk) -> dict:
    return {"t": c.term, "p": c.primary, "l": c.lsn, "lt": c.last_term, "o": c.offset, "d": c.data, "z": c.done}


def dec_chunk(a: Any) -> tuple[SnapshotChunk]:
    return (SnapshotChunk(_count(need(a, "t", int), "term"), _count(need(a, "p", int), "primary"),
                          _count(need(a, "l", int), "lsn"), _count(need(a, "lt", int), "last_term"),
                          _count(need(a, "o", int), "offset"), need(a, "d", bytes),
                          bool(opt(a, "z", bool, False))),)


@dataclass(frozen=True)
class MemberStatus:
    """What a member says of itself (``status``): for elections and for ``oribus up``."""

    member: int
    role: str  # "joining", "follower", "candidate", "primary"
    term: int  # its promised term
    voter: bool
    last: Position  # its last durable position
    primary: int = -1  # the member it follows (-1: none known)
    commit_lsn: int = 0  # the group's commit index as it last heard it
    applied_lsn: int = 0

    def to_wire(self) -> dict:
        return {"member": self.member, "role": self.role, "term": self.term, "voter": self.voter,
                "last": enc_position(self.last), "primary": self.primary, "commit": self.commit_lsn,
                "applied": self.applied_lsn}

    @classmethod
    def from_wire(cls, d: Any) -> MemberStatus:
        if not isinstance(d, dict):
            raise InvalidRequest("a member status is a map")
        return cls(int(d["member"]), str(d["role"]), int(d["term"]), bool(d["voter"]),
                   dec_position(d["last"]), int(d.get("primary", -1)), int(d.get("commit", 0)),
                   int(d.get("applied", 0)))


def dec_elect_args(a: Any) -> tuple[int, int]:
    return _count(need(a, "t", int), "term"), _count(need(a, "c", int), "candidate")


# Operations of oribus.v1.Replica: each is a method of the same name on the member's host
# (``oribus.hosts.replica``), which hands the first three to its ``ReplicaMember``.
REPLICA_OPS: dict[str, Op] = {
    "append": Op(enc_batch, dec_batch, enc_append_reply, dec_append_reply),
    "promise": Op(lambda term, candidate: {"t": term, "c": candidate}, dec_promise_args,
                  enc_promise_reply, dec_promise_reply),
    "install_snapshot": Op(enc_chunk, dec_chunk, enc_append_reply, dec_append_reply),
    "status": Op(lambda: {}, lambda a: (), lambda s: s.to_wire(), MemberStatus.from_wire),
    "elect": Op(lambda term, candidate: {"t": term, "c": candidate}, dec_elect_args, same, bool),
}
