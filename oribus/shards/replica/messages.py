"""What the members of one replica group say to each other (``specs/replication.md`` §3, §5, §7).

A log position is ``(term, lsn)``: the term in which the record was first appended and its
LSN. Every term's records begin with the ``TERM_START`` record its primary appends before it
serves, so a member knows each record's term from the ``TERM_START`` records it holds (and,
for records a snapshot covers, from the term the snapshot records).

Records travel as WAL frames exactly as the primary wrote them (``oribus.shards.wal.record``:
each frame carries its LSN and checksum), so a follower checks what it receives with the same
code that checks its own log at recovery, and writes the bytes unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

Position = tuple[int, int]  # (term, lsn); ordered by term, then LSN


@dataclass(frozen=True)
class AppendBatch:
    """Primary → member: records after ``prev``, and how far the group has committed.

    ``frames`` may be empty (a heartbeat: it still carries ``commit_lsn`` and proves the
    primary's term to the member)."""

    term: int  # the sender's term
    primary: int  # the sender's member id
    prev: Position  # the position of the record just before the first frame
    frames: bytes  # WAL frames, LSNs prev[1] + 1 .. last_lsn, in order
    last_lsn: int  # LSN of the last frame (prev[1] when frames is empty)
    commit_lsn: int  # the group's commit index: the member may apply up to here


@dataclass(frozen=True)
class AppendReply:
    ok: bool
    term: int  # the member's promised term (above the sender's: the sender is deposed)
    durable_lsn: int  # ok: every record up to here is fsynced on the member
    last: Position  # the member's last position (not ok: where the primary resends from)
    needs_snapshot: bool = False  # the member lacks records the primary no longer keeps
    voter: bool = True  # False: a learner, whose acknowledgements count in no majority (§7)


@dataclass(frozen=True)
class PromiseReply:
    granted: bool
    term: int  # the member's promised term after the request
    voter: bool  # False: a learner, which promises nothing
    last: Position  # the member's last durable position


@dataclass(frozen=True)
class SnapshotChunk:
    """Primary → learner: its latest snapshot, in chunks; the learner then receives the log
    after ``lsn`` as ``AppendBatch``es whose ``prev`` is ``(last_term, lsn)``."""

    term: int
    primary: int
    lsn: int  # the snapshot covers every record up to here
    last_term: int  # the term of the record at ``lsn``
    offset: int
    data: bytes
    done: bool


class Peer(Protocol):
    """How a member reaches another member of its group (a stream connection in a real
    group; direct calls in tests and the simulation). Every call may raise ``Unavailable``."""

    member_id: int

    async def append(self, batch: AppendBatch) -> AppendReply: ...
    async def promise(self, term: int, candidate: int) -> PromiseReply: ...
    async def install_snapshot(self, chunk: SnapshotChunk) -> AppendReply: ...
