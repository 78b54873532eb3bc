"""The ``group`` section of a replicated shard's stats: what its primary says of its replica group.

``oribus stats``, ``GET /v1/stats``, the dashboard and the bus's /metrics all read a shard's
stats through its serving primary (``ReplicaHost._stats``); for a replica group that answer
carries, beside the shard's own counters, this section (``specs/http.md``, "Stats")::

    "group": {
      "replicas": 3, "term": 7, "primary": 1,        # the primary's term is the shard's epoch
      "last_lsn": 912, "commit_lsn": 910,            # the primary's log and the group's commit index
      "members": [                                   # one per member id, 0 .. replicas - 1
        {"member": 0, "address": "h:p", "stream": "h:p", "role": "follower", "voter": true,
         "term": 7, "durable_lsn": 910, "applied_lsn": 910, "acked_lsn": 910,
         "lag_records": 2, "last_ack_seconds": 0.04, "error": null}, ...],
      "failovers": 2,                                # takeovers after the group's first
      "last_failover": {"at": 1796640000.5, "term": 7, "previous_primary": 0,
                        "previous_term": 6, "new_primary": 1} | null,
      "quorum_wait_seconds": {"member": 1, "le": [...], "counts": [...], "sum": 0.8},
      "etcd_error": null}

Where each value comes from, read when the stats are asked for (nothing is kept for it):

* the primary's own view (``ReplicatedWal``): its log's end, the commit index, and for each
  other member the records it has acknowledged (``acked_lsn``: durable there and agreeing),
  hence ``lag_records = last_lsn - acked_lsn``, and the time since its last accepted batch
  (``last_ack_seconds``). A member that stops answering keeps its ``acked_lsn`` while the log
  grows: its lag grows with every commit, its ``last_ack_seconds`` with every second.
* each member's own answer to ``status`` (asked concurrently, ``STATUS_TIMEOUT`` each): its
  role, promised term, voter flag, durable and applied LSN. ``role`` is ``primary`` for the
  one answering, ``learner`` for a member that is not (yet) a voter, else the role it
  reports (``follower``, ``candidate``, ``joining``); ``unreachable`` when it did not answer
  (its ``error`` says why) and ``absent`` when no process holds its id in etcd.
* etcd: the members' addresses (their claims) and the takeover record
  (``oribus.meta.groups.TakeoverRecord``), which names the last failover and counts them
  across every process the group has had. Unreachable etcd leaves those null and says why
  in ``etcd_error``; the rest is still there.
* ``quorum_wait_seconds``: the histogram ``oribus_replica_quorum_wait_seconds`` of this
  process (``Histogram.snapshot``), the time each durability wait took to reach a majority
  while this member was primary, with the member it comes from: the bus's /metrics shows it
  per member, so a failover starts a new series instead of mixing two processes' counts.

``group_section`` is the pure part (unit-tested); ``collect_group`` asks the members and etcd.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from oribus.errors import OribusError
from oribus.meta.groups import MemberRecord, TakeoverRecord
from oribus.metrics import REPLICA_QUORUM_SECONDS
from oribus.rpc.replica_codec import MemberStatus
from oribus.shards.replica.primary import Follower

if TYPE_CHECKING:
    from oribus.hosts.replica import ReplicaHost

# Seconds a member has to answer the primary's status call, and etcd its two reads: well
# inside the bus's stats timeout, so that one member or etcd down never hides the others.
STATUS_TIMEOUT = 0.5
ETCD_TIMEOUT = 1.0


def failover_view(takeover: TakeoverRecord | None) -> dict[str, Any] | None:
    """The last failover as stats show it (None: the group never failed over)."""
    if takeover is None or not takeover.is_failover:
        return None
    return {"at": takeover.at, "term": takeover.term, "previous_primary": takeover.previous_member,
            "previous_term": takeover.previous_term, "new_primary": takeover.member}


def member_row(member: int, *, record: MemberRecord | None, claims_known: bool,
               status: MemberStatus | BaseException | None, follower: Follower | None, last_lsn: int,
               now: float) -> dict[str, Any]:
    """One other member's row (module docstring). ``claims_known``: whether etcd answered (a
    missing ``record`` then means no process holds the id); ``now``: ``time.monotonic()``."""
    answered = status if isinstance(status, MemberStatus) else None
    error = f"{type(status).__name__}: {status}" if isinstance(status, BaseException) else None
    if answered is not None:
        role = answered.role if answered.voter else "learner"
    elif record is None and claims_known:
        role, error = "absent", "no process holds this member id"
    else:
        role = "unreachable"
    acked_at = follower.acked_at if follower is not None else None
    return {
        "member": member,
        "address": record.address if record is not None else None,
        "stream": record.stream if record is not None else None,
        "role": role,
        # not answering: as its last accepted batch said (None: it never accepted one)
        "voter": answered.voter if answered is not None else (follower.voter if follower and acked_at else None),
        "term": answered.term if answered is not None else None,
        "durable_lsn": answered.last[1] if answered is not None else None,
        "applied_lsn": answered.applied_lsn if answered is not None else None,
        "acked_lsn": follower.match_lsn if follower is not None else None,
        "lag_records": last_lsn - follower.match_lsn if follower is not None else None,
        "last_ack_seconds": round(now - acked_at, 3) if acked_at is not None else None,
        "error": error,
    }


def group_section(*, replicas: int, me: int, term: int, last_lsn: int, durable_lsn: int, commit_lsn: int,
                  followers: Sequence[Follower], statuses: Mapping[int, MemberStatus | BaseException | None],
                  records: Mapping[int, MemberRecord] | None, takeover: TakeoverRecord | None,
                  etcd_error: str | None = None, quorum: Mapping[str, Any] | None = None,
                  now: float | None = None) -> dict[str, Any]:
    """The ``group`` section of the primary ``me`` of ``term`` (module docstring).

    ``followers``: the primary's ``ReplicatedWal.followers``; ``statuses``: each other
    member's answer to ``status`` (or the error it raised, None: not asked); ``records``:
    the member claims in etcd (None: etcd did not answer, ``etcd_error`` says why)."""
    now = time.monotonic() if now is None else now
    by_id = {f.member_id: f for f in followers}
    known = records or {}
    own = known.get(me)
    members: list[dict[str, Any]] = [{
        "member": me, "address": own.address if own is not None else None,
        "stream": own.stream if own is not None else None, "role": "primary", "voter": True, "term": term,
        # the primary applies a record once it is committed: its applied LSN is the commit index
        "durable_lsn": durable_lsn, "applied_lsn": commit_lsn, "acked_lsn": durable_lsn, "lag_records": 0,
        "last_ack_seconds": None, "error": None,
    }]
    for m in range(replicas):
        if m == me:
            continue
        members.append(member_row(m, record=known.get(m), claims_known=records is not None,
                                  status=statuses.get(m), follower=by_id.get(m), last_lsn=last_lsn, now=now))
    members.sort(key=lambda r: r["member"])
    return {
        "replicas": replicas, "term": term, "primary": me, "last_lsn": last_lsn, "commit_lsn": commit_lsn,
        "members": members,
        "failovers": takeover.failovers if takeover is not None else (None if etcd_error else 0),
        "last_failover": failover_view(takeover),
        "quorum_wait_seconds": {"member": me, **quorum} if quorum is not None else None,
        "etcd_error": etcd_error,
    }


async def collect_group(host: ReplicaHost) -> dict[str, Any] | None:
    """The ``group`` section of ``host``'s stats while it is the serving primary (None
    otherwise): every other member asked for its status, etcd for the claims and the
    takeover record, all at once."""
    member, peers, rwal = host.member, host.peers, host.member.rwal if host.member is not None else None
    if member is None or peers is None or rwal is None or not host.term:
        return None

    async def status(m: int) -> MemberStatus | BaseException:
        try:
            return await asyncio.wait_for(peers.client(m).status(), STATUS_TIMEOUT)
        except TimeoutError:
            return TimeoutError(f"no answer within {STATUS_TIMEOUT:g} s")
        except (OribusError, OSError) as e:
            return e

    async def etcd() -> tuple[dict[int, MemberRecord] | None, TakeoverRecord | None, str | None]:
        try:
            records, takeover = await asyncio.wait_for(asyncio.gather(
                host.groups.members(host.shard_id), host.groups.takeover(host.shard_id)), ETCD_TIMEOUT)
        except TimeoutError:
            return None, None, f"etcd did not answer within {ETCD_TIMEOUT:g} s"
        except OribusError as e:
            return None, None, e.message
        return records, takeover, None

    others = [p.member_id for p in peers.peers]
    answers, (records, takeover, etcd_error) = await asyncio.gather(
        asyncio.gather(*(status(m) for m in others)), etcd())
    quorum = REPLICA_QUORUM_SECONDS.labels(shard=str(host.shard_id)).snapshot()
    return group_section(replicas=host.replicas, me=host.member_id, term=host.term, last_lsn=rwal.last_lsn,
                         durable_lsn=rwal.durable_lsn, commit_lsn=rwal.commit_lsn, followers=rwal.followers,
                         statuses=dict(zip(others, answers, strict=True)), records=records, takeover=takeover,
                         etcd_error=etcd_error, quorum=quorum)
