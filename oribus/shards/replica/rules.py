"""The decisions of a replica group, without IO (``specs/replication.md`` §3, §5, §7).

``ReplicaMember`` (a follower's side) and ``ReplicatedWal`` (the primary's) are shells: they
move frames to and from the WAL and call peers; what to accept, what to cut, what is
committed and where to resend from is decided here, by plain functions of plain values, so
tests and the deterministic simulation can drive the rules directly:

    plan_append        rules 1 and 2 of §3 and what an accepted batch changes in the log
    quorum_lsn         the highest LSN durable on a majority of the voters
    commit_index       the primary's commit index: counts only from its term's TERM_START
    resend_from        a refused batch's next LSN
    becomes_voter      §7: when a learner holds every acknowledged record
    may_promise        §5 step 2 (a learner promises nothing)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from oribus.shards.replica.messages import AppendBatch
from oribus.shards.replica.terms import Terms
from oribus.shards.wal.record import TERM_START, Frame, split_frames


@dataclass(frozen=True)
class AppendPlan:
    """What to do with one ``AppendBatch`` (``plan_append``)."""

    ok: bool
    refusal: str = ""  # why not: "term" (rule 1), "mismatch" (rule 2), "damaged" (bad frames)
    frames: list[Frame] = field(default_factory=list)  # the batch's frames, checked and decoded
    truncate_after: int | None = None  # cut the log after this LSN first (a divergent tail)
    append_from: int = 0  # index in ``frames`` of the first frame to append (the rest it holds)
    detail: str = ""


def plan_append(batch: AppendBatch, *, promised_term: int, terms: Terms, last_lsn: int,
                floor: int) -> AppendPlan:
    """Decide on ``batch`` for a member whose promised term is ``promised_term``, whose log
    ends at ``last_lsn`` with ``terms``, and whose records up to ``floor`` are only in its
    snapshot (committed: they agree with any primary's log by log matching).

    Rule 1: a term below the promised one is refused. Rule 2: the member's record at ``prev``
    must be of ``prev``'s term. Accepted: the frames must be intact and numbered from
    ``prev + 1`` to ``last_lsn``; those it already holds in the same term are kept, the first
    that differs marks a divergent tail to cut, and everything from there is appended.
    """
    if batch.term < promised_term:
        return AppendPlan(False, "term")
    prev_term, prev_lsn = batch.prev
    if prev_lsn > last_lsn or (prev_lsn >= floor and terms.term_at(prev_lsn) != prev_term):
        return AppendPlan(False, "mismatch")
    try:
        frames = split_frames(batch.frames, prev_lsn + 1)
        end = frames[-1].lsn if frames else prev_lsn
        if end != batch.last_lsn:
            raise ValueError(f"the frames end at LSN {end}, the batch says {batch.last_lsn}")
    except ValueError as e:
        return AppendPlan(False, "damaged", detail=str(e))
    term = prev_term
    for i, frame in enumerate(frames):
        if frame.rtype == TERM_START:
            term = frame.body["t"]
        if frame.lsn <= floor:
            continue
        if frame.lsn > last_lsn:
            return AppendPlan(True, frames=frames, append_from=i)
        if terms.term_at(frame.lsn) != term:
            return AppendPlan(True, frames=frames, truncate_after=frame.lsn - 1, append_from=i)
    return AppendPlan(True, frames=frames, append_from=len(frames))


def quorum_lsn(own_durable: int, voter_acks: Iterable[int], replicas: int) -> int:
    """The highest LSN durable on a majority of a group of ``replicas``: the primary counts
    itself at ``own_durable``, each voter follower at its acknowledged LSN (learners are not
    passed in). 0 while fewer than a majority of voters are known."""
    majority = replicas // 2 + 1
    acks = sorted([own_durable, *voter_acks], reverse=True)
    return acks[majority - 1] if len(acks) >= majority else 0


def commit_index(current: int, quorum: int, term_start_lsn: int | None) -> int:
    """The commit index after the quorum LSN moved: it never goes down, and it moves only
    once this term's ``TERM_START`` is on a majority — an older term's record is never
    counted committed by its copies alone (§5 step 5)."""
    if term_start_lsn is None or quorum < term_start_lsn:
        return current
    return max(current, quorum)


def resend_from(terms: Terms, prev: tuple[int, int], their_last_lsn: int, current_next: int) -> int:
    """The next LSN for a follower that refused a batch after ``prev`` (rule 2) and named its
    last LSN: just after its last record if it ends before ``prev``; otherwise its record at
    ``prev`` is of another term, so back to the first LSN of ``prev``'s term in this log.
    Always below ``current_next`` and at least 1 (``prev`` = (0, 0) always agrees)."""
    prev_term, prev_lsn = prev
    if their_last_lsn < prev_lsn:
        nxt = their_last_lsn + 1
    else:
        first = terms.first_lsn_of(prev_term) if prev_term else None
        nxt = first if first is not None and first < prev_lsn else prev_lsn
    return max(1, min(nxt, current_next - 1))


def becomes_voter(voter: bool, terms: Terms, batch_term: int, matched: int, commit_lsn: int) -> bool:
    """§7: a learner becomes a voter once an accepted batch shows it holds the primary's log up
    to ``matched`` and ``matched`` reaches the primary's commit index — and that commit index
    covers the primary's own ``TERM_START``. A primary's commit index starts at 0 in its term
    and counts nothing of earlier terms until its ``TERM_START`` is committed; only from then
    does it stand for every record acknowledged before (which its log holds, R-2). Promoted
    against a commit index of 0, a learner could count as a voter while lacking a record an
    earlier primary acknowledged."""
    if voter or matched < commit_lsn:
        return False
    start = terms.first_lsn_of(batch_term)
    return start is not None and start <= commit_lsn


def may_promise(voter: bool, promised_term: int, term: int) -> bool:
    """§5 step 2: a voter promises a term at or above the one it promised; a learner nothing."""
    return voter and term >= promised_term
