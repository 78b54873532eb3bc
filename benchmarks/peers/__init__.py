"""The backends the comparison runs, one file each, behind one interface (``peers.base``).

======================  ===========================================================  =======
row                     what                                                         durable
======================  ===========================================================  =======
oribus-embedded         ``oribus.open_local`` in the harness process, 1 shard        yes
oribus-up               ``oribus up`` (bus + 1 in-process shard), the SDK's default  yes
oribus-procs            ``oribus up --processes`` (2 shard processes)                yes
oribus-procs-r3         each shard a group of 3 members (``--replicas 3``)           yes
oribus-up-lmdb          ``oribus up --history-store lmdb`` (kept versions on disk)   yes
redis-always            Redis 7 WATCH/MULTI/EXEC, ``appendfsync always``             yes
redis-everysec          the same with ``appendfsync everysec``                       NO
postgres                PostgreSQL 15 SERIALIZABLE, reads ``FOR SHARE``              yes
etcd                    etcd 3.4 Txn comparing the mod revision of every key read    yes
======================  ===========================================================  =======

Not in the default set: ``oribus-procs-r3`` (what replication costs: run it beside
``oribus-procs``, same run, same machine), ``oribus-up-lmdb`` (the history on disk: what it
costs, and what it saves when a run's history would grow the server's memory by GBs), ``postgres-ssi`` (SERIALIZABLE with plain reads: SSI
may commit a step after a key it read was overwritten, see
``postgres_serializable``), ``oribus-up-grpc`` and ``oribus-procs-grpc`` (the SDK kept on
gRPC, what a client without the stream transport gets), ``redis-always-pyparser`` (redis-py's own reply parser
instead of hiredis: the slower client an older run used), and two deliberately broken clients that exist
only to prove the audit catches them: ``redis-always-nowatch`` and
``oribus-embedded-blind``.
"""

from __future__ import annotations

from collections.abc import Callable

from peers.base import Backend, BackendUnavailable, Client, Outcome


def _oribus_embedded(**kw) -> Backend:
    from peers.oribus_embedded import OribusEmbedded

    return OribusEmbedded(**kw)


def _oribus_server(processes: bool, transport: str = "auto", replicas: int = 1,
                   history_store: str | None = None) -> Callable[..., Backend]:
    def make(**kw) -> Backend:
        from peers.oribus_server import OribusServer

        return OribusServer(processes=processes, transport=transport, replicas=replicas,
                            history_store=history_store, **kw)

    return make


def _redis(fsync: str, **fixed) -> Callable[..., Backend]:
    def make(**kw) -> Backend:
        from peers.redis_watch import RedisWatch

        return RedisWatch(fsync, **fixed, **kw)

    return make


def _postgres(read_lock: str) -> Callable[..., Backend]:
    def make(**kw) -> Backend:
        from peers.postgres_serializable import PostgresSerializable

        return PostgresSerializable(read_lock, **kw)

    return make


def _etcd(**kw) -> Backend:
    from peers.etcd_txn import EtcdTxn

    return EtcdTxn(**kw)


# name -> factory: the oribus ones take shards=, the peers install= (see make_backend)
BACKENDS: dict[str, Callable[..., Backend]] = {
    "oribus-embedded": _oribus_embedded,
    "oribus-up": _oribus_server(False),
    "oribus-procs": _oribus_server(True),
    "oribus-procs-r3": _oribus_server(True, replicas=3),
    "redis-always": _redis("always"),
    "redis-everysec": _redis("everysec"),
    "postgres": _postgres("share"),
    "etcd": _etcd,
    # not run unless named
    "postgres-ssi": _postgres("none"),
    "redis-always-nowatch": _redis("always", unsafe_skip_watch=True),
    "redis-always-pyparser": _redis("always", parser="python"),
    "oribus-up-grpc": _oribus_server(False, "grpc"),
    "oribus-procs-grpc": _oribus_server(True, "grpc"),
    "oribus-up-lmdb": _oribus_server(False, history_store="lmdb"),
    "oribus-embedded-blind": lambda **kw: _oribus_embedded(unsafe_blind_write=True, **kw),
}
DEFAULT_BACKENDS = ["oribus-embedded", "oribus-up", "oribus-procs", "redis-always", "redis-everysec",
                    "postgres", "etcd"]


def default_shards(name: str) -> int:
    """What a user of that deployment gets by default: ``open_local`` and ``oribus up`` create
    one shard (in one process more add two-phase commits, not parallelism), ``oribus up
    --processes`` one shard process per core of this machine (2)."""
    return 2 if name.startswith("oribus-procs") else 1


def make_backend(name: str, *, shards: int | None = None, install: bool = True) -> Backend:
    if name not in BACKENDS:
        raise KeyError(f"unknown backend {name!r}: one of {', '.join(BACKENDS)}")
    if name.startswith("oribus"):
        return BACKENDS[name](shards=shards or default_shards(name))
    return BACKENDS[name](install=install)


__all__ = ["BACKENDS", "DEFAULT_BACKENDS", "Backend", "BackendUnavailable", "Client", "Outcome",
           "default_shards", "make_backend"]
