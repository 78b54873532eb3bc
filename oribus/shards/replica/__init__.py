"""Replicated shards (``specs/replication.md``): one shard kept by a group of members.

Files:

    messages.py  what members say to each other (AppendBatch, AppendReply, PromiseReply,
                 SnapshotChunk) and ``Peer``, how a member reaches another
    terms.py     ``Terms``: the term of each record of a log (term -> first LSN)
    member.py    ``ReplicaMember``: one member's durable state, the follower's side of the
                 protocol (append, promise, install_snapshot), becoming primary
    primary.py   ``ReplicatedWal``: the primary's WAL, whose durability points wait for a
                 majority, and the shipping of the log to every other member
    files.py     ``MemberFiles``: every file operation of a member (the simulation's seam)
    rules.py     the decisions without IO: what an append changes, the commit index, where
                 to resend from, who may promise
    direct.py    ``DirectNetwork`` / ``DirectPeer``: members calling each other in process,
                 with partitions, lost replies and pauses (tests, the simulation)

Elections, which need etcd, are not here (the cluster layer: ``oribus.hosts``); it drives
them through the API below. An unreplicated shard (``--replicas 1``) is a plain ``Shard``
and none of this runs.

The API the cluster layer codes against
---------------------------------------
::

    from oribus.shards.replica import ReplicaMember, ReplicationOptions

    member = await ReplicaMember.open(data_dir, shard_id, member_id, replicas,
                                      config=shard_config,        # ShardConfig(data_dir=data_dir)
                                      term_register=etcd_term,    # read from etcd at start
                                      options=ReplicationOptions(),
                                      dir_lock=None)              # or the lock the caller holds

``open`` never refuses missing or damaged data: it opens a learner with an empty log
(damaged files moved to ``<data_dir>/damaged-<ns>/``). An empty directory is a new voter
only when ``term_register`` is 0 (the group never had a term). It raises ``InvalidRequest``
for a directory of another shard or another member, ``DataDirLocked`` as a shard does.

Server side — what a stream server calls when another member's message arrives (each may
raise ``Unavailable``: the member is closed, or it is the primary of that very term)::

    reply: AppendReply   = await member.append(batch: AppendBatch)
    reply: PromiseReply  = await member.promise(term, candidate_member_id)
    reply: AppendReply   = await member.install_snapshot(chunk: SnapshotChunk)

Election side::

    member.set_promised_term(t)     # the etcd term register, read at (re)start: fsynced
    member.voter                    # False: a learner; never a candidate, never promises
    member.last_position            # (term, lsn) of its last durable record
    member.promised_term
    # the candidate asks every voter (itself included: await member.promise(t, me)) and
    # takes over only with a majority of grants, if its last_position is the highest:
    shard = await member.become_primary(t, peers)   # peers: a Peer per other member
    # ... serve ``shard`` (a Shard: the ShardService the bus calls), epoch == t ...
    await member.step_down()        # lease lost / shutdown: the Shard is closed, follower again
    member.on_deposed = callback    # called with the higher term when a reply or a promise
                                    # shows one; the member has already stopped acknowledging
                                    # and steps down by itself (the Shard gets closed)
    member.is_primary, member.role  # "follower" | "starting" | "primary" | "closed"
    member.status()                 # role, term, last position, commit and applied LSN, lag
    await member.close()

``become_primary`` appends ``TERM_START``, waits until it is committed on a majority (no
timeout of its own: wrap it in ``asyncio.wait_for``; cancelling it leaves a follower), then
recovers a ``Shard`` on the data directory as a restart does (PREPARED transactions wait for
``shard.resolver`` as today; the restart grace is kept, except for the group's very first
term). It raises ``Unavailable`` if a higher term appears meanwhile, ``InvalidRequest`` for a
learner or a term not above the log's last.

A ``Peer`` is anything with ``member_id`` and the three coroutines above (``messages.Peer``);
it raises ``Unavailable`` when the member cannot be reached.
"""

from oribus.shards.replica.direct import DirectNetwork, DirectPeer
from oribus.shards.replica.member import ReplicaMember, ReplicaShard
from oribus.shards.replica.messages import (
    AppendBatch,
    AppendReply,
    Peer,
    Position,
    PromiseReply,
    SnapshotChunk,
)
from oribus.shards.replica.primary import ReplicatedWal, ReplicationOptions
from oribus.shards.replica.terms import Terms

__all__ = [
    "AppendBatch",
    "AppendReply",
    "DirectNetwork",
    "DirectPeer",
    "Peer",
    "Position",
    "PromiseReply",
    "ReplicaMember",
    "ReplicaShard",
    "ReplicatedWal",
    "ReplicationOptions",
    "SnapshotChunk",
    "Terms",
]
