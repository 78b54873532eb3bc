"""A member's role and the election rule, sans IO (``specs/replication.md`` §5–§7).

The member process (``oribus.hosts.replica``) moves between four roles; every move is one
of these (anything else is a bug, ``RoleMachine.move`` raises)::

    JOINING ──claimed, term adopted──▶ FOLLOWER ──primary key absent──▶ CANDIDATE
       ▲                                 ▲  ▲                               │
       │                                 │  └──lost, deferred, no quorum────┤
       └───── lease lost (any role) ─────┤                                  ▼
                                         └──deposed, lease past, stopped── PRIMARY

``decide`` is §5 rule 3: with the promises a candidate collected for its term, it takes
over only with promises from a majority of the group's ``R`` member slots that are
voters (itself included; a learner counts as a slot that did not promise, so a group whose
complete members are down stays unavailable rather than electing an incomplete one), and
only if its last position is the highest among them (ties: the lowest member id);
otherwise it defers to the member that has it. A promise refused with a higher term means
a newer election exists: the candidate abandons.

The restart grace a new primary keeps (and its waiver for a brand-new group's first term)
is the member's own business (``ReplicaMember.become_primary``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from oribus.shards.replica.messages import Position, PromiseReply


class Role(enum.Enum):
    JOINING = "joining"
    FOLLOWER = "follower"
    CANDIDATE = "candidate"
    PRIMARY = "primary"


_MOVES = {
    (Role.JOINING, Role.FOLLOWER),
    (Role.FOLLOWER, Role.CANDIDATE),
    (Role.CANDIDATE, Role.FOLLOWER),
    (Role.CANDIDATE, Role.PRIMARY),
    (Role.PRIMARY, Role.FOLLOWER),
    (Role.FOLLOWER, Role.JOINING),
    (Role.CANDIDATE, Role.JOINING),
    (Role.PRIMARY, Role.JOINING),
}


class RoleMachine:
    """The current role, moved only along the edges drawn in the module docstring."""

    def __init__(self) -> None:
        self.role = Role.JOINING
        self.moves = 0

    @staticmethod
    def is_move_valid(old: Role, new: Role) -> bool:
        return (old, new) in _MOVES

    def move(self, new: Role) -> None:
        if not self.is_move_valid(self.role, new):
            raise RuntimeError(f"a member cannot go from {self.role.value} to {new.value}")
        self.role = new
        self.moves += 1


def majority(replicas: int) -> int:
    """Members of a majority of a group of ``replicas``."""
    return replicas // 2 + 1


class Outcome(enum.Enum):
    TAKE_OVER = "take over"  # this candidate is the most complete of a majority
    DEFER = "defer"  # another promising member is more complete: it takes over (``Decision.to``)
    NO_QUORUM = "no quorum"  # too few voters promised: stay a follower, try again later
    ABANDON = "abandon"  # a member promised a higher term: a newer election exists


@dataclass(frozen=True)
class Decision:
    outcome: Outcome
    to: int = -1  # DEFER: the member that takes over
    voters: int = 0  # voters that promised, the candidate included
    newer_term: int = 0  # ABANDON: the highest term a member named


def decide(replicas: int, me: int, my_last: Position, i_am_voter: bool, term: int,
           promises: dict[int, PromiseReply]) -> Decision:
    """§5 rule 3 for candidate ``me`` in ``term`` (see the module docstring); ``promises``:
    member id -> its answer (members that did not answer are absent)."""
    newer = max((p.term for p in promises.values() if not p.granted), default=0)
    if newer > term:
        return Decision(Outcome.ABANDON, newer_term=newer)
    voters: dict[int, Position] = {m: p.last for m, p in promises.items() if p.granted and p.voter and m != me}
    if i_am_voter:
        voters[me] = my_last
    if len(voters) < majority(replicas):
        return Decision(Outcome.NO_QUORUM, voters=len(voters))
    # the highest position; among equals the lowest member id
    best = min(voters, key=lambda m: (-voters[m][0], -voters[m][1], m))
    if best == me:
        return Decision(Outcome.TAKE_OVER, voters=len(voters))
    return Decision(Outcome.DEFER, to=best, voters=len(voters))

