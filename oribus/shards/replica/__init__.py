"""Replicated shards (``specs/replication.md``): one shard kept by a group of members.

``messages.py`` holds what members say to each other (log shipping, promises, snapshots);
``member.py`` a member's side of it (``ReplicaMember``), ``primary.py`` the primary's
``ReplicatedWal``. Elections, which need etcd, are not here: ``oribus.hosts.replica``.
"""
