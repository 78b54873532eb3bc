"""The ``oribus`` command line.

Servers: ``up`` (bus + shards on this machine), ``shard``, ``bus``.
Clients (talk to ``--addr``, print JSON): ``get``, ``put``, ``history``,
``rollback``, ``watch``, ``stats``; ``mcp`` serves the bus to MCP clients (stdio or HTTP);
``proxy`` is the LLM-traffic proxy. Tools: ``demo``, ``repair``, ``check``, ``verify`` (the
consistency check of a live deployment), ``certs init``, ``auth`` (signing keys, tokens,
revocation: ``oribus.auth.commands``), ``bench`` (runs the repository's
``benchmarks/compare.py``).
With ``--tls-dir`` (servers and clients) every gRPC connection is mutual TLS.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shlex
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from oribus.auth import Authority
    from oribus.client.sync import SyncSession
    from oribus.gateway import GatewayConfig
    from oribus.meta.auth_store import EtcdAuthStore
    from oribus.meta.cluster_meta import ClusterMeta
    from oribus.meta.etcd import EtcdMeta
    from oribus.tls import TlsConfig

from oribus.rpc.wire import DEFAULT_BUS_ADDRESS


def _json_default(o: Any) -> Any:
    if isinstance(o, bytes):
        return {"$bytes": base64.b64encode(o).decode()}
    if isinstance(o, tuple):
        return list(o)
    return str(o)


def _print(obj: Any) -> None:
    print(json.dumps(obj, default=_json_default, ensure_ascii=False))


def _run(coro: Any, *, serving: bool = False) -> Any:
    """Run ``coro`` on uvloop; ``serving``: a server process (``oribus.hosts.heap``)."""
    if serving:
        from oribus.hosts.heap import serve_with_few_collections

        serve_with_few_collections()
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:  # pragma: no cover
        return asyncio.run(coro)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("oribus")
    except PackageNotFoundError:  # run from a source tree that was never installed
        import oribus

        return oribus.__version__


# ---- servers ----------------------------------------------------------------------------


def _gateway_config(args: argparse.Namespace) -> GatewayConfig | None:
    from oribus.gateway import GatewayConfig

    if args.no_http:
        return None
    from oribus.bus.sessions import SessionLimits

    limits = SessionLimits(max_sessions=args.http_sessions, max_per_agent=args.http_sessions_per_agent,
                           max_per_client=args.http_sessions_per_client)
    return GatewayConfig(listen=args.http, admin=args.admin, sbus_max_delta=args.sbus_max_delta,
                         allow_origins=tuple(args.http_allow_origin), hosts=tuple(args.http_host),
                         max_connections=args.http_max_connections, session_limits=limits,
                         tls=_tls(args), mtls=args.http_mtls)


def _cmd_up(args: argparse.Namespace) -> int:
    from oribus.hosts.up import UpHost, run_until_signalled

    cluster = UpHost(Path(args.data_dir), listen=args.listen, shards=args.shards, processes=args.processes,
                           http=_gateway_config(args), tls=_tls(args), unsafe_allow_empty=args.allow_empty,
                           shard_transport=args.shard_transport, read_lease_seconds=args.read_lease,
                           stream_listen=args.stream_listen, authority=_authority(args),
                           replicas=args.replicas, etcd=args.etcd, lease_ttl=args.lease_ttl,
                           cluster_name=args.cluster, history_store=args.history_store,
                           history_limit=args.history_versions, history_max_age=args.history_max_age)
    _run(run_until_signalled(cluster), serving=True)
    return 0


def _authority(args: argparse.Namespace) -> Authority | None:
    """``--auth D``: the auth directory every transport checks credentials against, or None."""
    if not getattr(args, "auth", None):
        return None
    from oribus.auth import Authority

    return Authority(args.auth)  # an unusable directory stops the server now, naming the file


def _auth_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--auth", metavar="DIR",
                   help="require a signed token (or an agent certificate) on every call, and apply "
                        "DIR/policy.yaml's access rules; DIR is made by `oribus auth init` (specs/auth.md)")


def _tls(args: argparse.Namespace) -> TlsConfig | None:
    """``--tls-dir``: mutual TLS on every gRPC listener and client of the command, or None."""
    if not getattr(args, "tls_dir", None):
        return None
    from oribus.tls import TlsConfig, server_credentials

    cfg = TlsConfig.from_dir(args.tls_dir)
    server_credentials(cfg)  # every caller serves: bad files stop it now (naming the file), before any claim
    return cfg


def _meta(args: argparse.Namespace) -> EtcdMeta | None:
    """The cluster metadata named on the command line: etcd, or None."""
    if not getattr(args, "etcd", None):
        return None
    from oribus.meta.etcd import EtcdMeta

    return EtcdMeta(args.etcd, args.cluster, lease_ttl=args.lease_ttl)


def _ordinal(raw: str, flag: str) -> int:
    """A number, or ``ordinal``: the number after the last '-' of the pod's name (``$POD_NAME``,
    else the host name), the pod's ordinal in its StatefulSet."""
    import os
    import socket

    if raw != "ordinal":
        if not raw.isdigit():
            raise SystemExit(f"{flag} {raw!r}: give a number, or 'ordinal'")
        return int(raw)
    host = os.environ.get("POD_NAME") or socket.gethostname()
    suffix = host.rsplit("-", 1)[-1]
    if not suffix.isdigit():
        raise SystemExit(f"{flag} ordinal: host name {host!r} does not end in -<number>")
    return int(suffix)


def _shard_id(raw: str) -> int:
    """``--id N``, or ``--id ordinal``: a StatefulSet pod ``oribus-shard-2`` serves shard 2."""
    return _ordinal(raw, "--id")


def _member_id(raw: str | None) -> int | None:
    """``--member M``, or ``--member ordinal``: pod ``oribus-shard-1-2`` of the StatefulSet of shard 1's
    replica group (deploy/k8s/replica-group) is member 2, on every restart and on a new volume."""
    return None if raw is None else _ordinal(raw, "--member")


def _int_or_ordinal(text: str) -> str:
    if text != "ordinal" and not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is neither a number nor 'ordinal'")
    return text


def _cmd_shard(args: argparse.Namespace) -> int:
    from oribus.hosts.shard import ClaimLost, run_shard_server
    from oribus.meta.cluster_meta import ClaimRefused
    from oribus.shards.config import ShardConfig

    if args.parent_fd is not None:  # a shard process of `oribus up --processes`: dies with it
        from oribus.lifeline import die_with_parent

        die_with_parent(args.parent_fd)
    shard_id = _shard_id(args.id)
    if args.member is not None and not args.etcd:
        print("oribus shard: --member names a member of a replica group, which needs --etcd", file=sys.stderr)
        return 2
    from oribus.shards.wal import WalConfig

    config = ShardConfig(shard_id, Path(args.data_dir), unsafe_allow_empty=args.allow_empty,
                         read_lease_seconds=args.read_lease, clock_skew_seconds=args.clock_skew,
                         wal=WalConfig(unsafe_no_fsync=args.unsafe_no_fsync), history_store=args.history_store,
                         history_limit=args.history_versions, history_max_age_seconds=args.history_max_age)
    try:
        _run(run_shard_server(shard_id, Path(args.data_dir), args.listen, config=config,
                              ready_file=Path(args.ready_file) if args.ready_file else None,
                              tls=_tls(args), meta=_meta(args), advertise=args.advertise,
                              claim_wait=args.lease_ttl * 2 + 1 if args.claim_wait is None else args.claim_wait,
                              stream_listen=args.stream_listen, advertise_stream=args.advertise_stream,
                              member=_member_id(args.member)),
             serving=True)
    except ClaimRefused as e:
        print(f"oribus shard: refused: {e}", file=sys.stderr)
        return 3
    except ClaimLost as e:
        print(f"oribus shard: stopped: {e}", file=sys.stderr)
        return 4
    return 0


def _cmd_bus(args: argparse.Namespace) -> int:
    from oribus.hosts.bus import run_bus
    from oribus.meta.cluster_meta import StaticMeta

    etcd = _meta(args)
    meta: ClusterMeta | None = etcd
    authority, follower = None, None
    if etcd is not None and args.auth:  # cluster mode: the rules published in etcd, else the directory's
        from oribus.hosts.auth_follower import AuthFollower
        from oribus.meta.auth_store import EtcdAuthStore

        follower = AuthFollower(EtcdAuthStore(etcd), args.auth)
    else:
        authority = _authority(args)
    if meta is None:
        addrs = [a.strip() for a in (args.shards or "").split(",") if a.strip()]
        if not addrs:
            print("oribus bus needs --etcd URL or --shards HOST:PORT,...", file=sys.stderr)
            return 2
        meta = StaticMeta(addrs)
    _run(run_bus(meta, Path(args.data_dir), args.listen, http=_gateway_config(args), tls=_tls(args),
                 advertise=args.advertise, advertise_http=args.advertise_http,
                 shard_transport=args.shard_transport, stream_listen=args.stream_listen,
                 advertise_stream=args.advertise_stream, authority=authority, auth_follower=follower),
         serving=True)
    return 0


def _cmd_cluster_init(args: argparse.Namespace) -> int:
    from oribus.meta.cluster_meta import ClusterConfig
    from oribus.meta.slots import StaticSlotMap

    if args.shards < 1:
        print("--shards must be >= 1", file=sys.stderr)
        return 2
    from oribus.meta.groups import REPLICA_COUNTS

    if args.replicas not in REPLICA_COUNTS:
        print(f"--replicas must be one of {', '.join(map(str, REPLICA_COUNTS))}", file=sys.stderr)
        return 2
    meta = _meta(args)
    if meta is None:
        print("oribus cluster init needs --etcd URL", file=sys.stderr)
        return 2

    async def main() -> bool:
        try:
            owners = tuple(StaticSlotMap(args.shards)._owner)
            return await meta.init_cluster(ClusterConfig(args.shards, owners=owners, replicas=args.replicas))
        finally:
            await meta.close()

    created = _run(main())
    _print({"cluster": args.cluster, "shards": args.shards, "replicas": args.replicas, "created": created})
    return 0


# ---- clients ----------------------------------------------------------------------------


def _client(args: argparse.Namespace) -> SyncSession:
    import oribus

    return oribus.Client(args.addr, agent=args.agent, tls=args.tls_dir, token=args.token)


def _item(i: Any) -> dict:
    return {"key": i.key, "value": i.value, "version": i.version}


def _cmd_get(args: argparse.Namespace) -> int:
    with _client(args) as c:
        _print(_item(c.get(args.key)))
    return 0


def _cmd_put(args: argparse.Namespace) -> int:
    try:
        value = json.loads(args.json)
    except ValueError as e:
        # a bare word is the usual slip: say how to store it as a JSON string
        hint = shlex.quote(json.dumps(args.json))
        message = (f"value must be JSON ({e}): to store the string {args.json}, quote it: "
                   f"oribus put {shlex.quote(args.key)} {hint}")
        print(json.dumps({"error": "InvalidRequest", "message": message}, ensure_ascii=False), file=sys.stderr)
        return 2
    with _client(args) as c:
        version = c.put(args.key, value, expect=args.expect)
        _print({"key": args.key, "version": version})
    return 0


def _cmd_history(args: argparse.Namespace) -> int:
    with _client(args) as c:
        _print([v._asdict() for v in c.history(args.key, limit=args.limit)])
    return 0


def _cmd_rollback(args: argparse.Namespace) -> int:
    with _client(args) as c:
        c.get(args.key)  # the rollback depends on the key's current version
        _print({"key": args.key, "version": c.rollback({args.key: args.version})[args.key]})
    return 0


def _cmd_watch(args: argparse.Namespace) -> int:
    with _client(args) as c:
        for n, ev in enumerate(c.watch(prefix=args.prefix, from_version=args.from_version), 1):
            _print(ev._asdict() if hasattr(ev, "_asdict") else ev)
            sys.stdout.flush()
            if args.count and n >= args.count:
                break
    return 0


def _cmd_stats(args: argparse.Namespace) -> int:
    with _client(args) as c:
        _print(c.stats())
    return 0


# ---- oribus proxy ---------------------------------------------------------------------------


def _cmd_proxy(args: argparse.Namespace) -> int:
    """The LLM-traffic proxy (``oribus.integrations.proxy``) over the bus at ``--addr``, or an
    embedded engine on ``--data-dir`` that this process then owns."""
    import oribus
    from oribus.hosts.lifecycle import stop_signal_event
    from oribus.integrations.proxy import ProxyConfig, load_key_map, serve

    host, _, port = args.listen.rpartition(":")
    config = ProxyConfig(args.upstream, host=host or "127.0.0.1", port=int(port), agent_header=args.agent_header,
                         key_map=load_key_map(args.key_map) if args.key_map else {},
                         record_timeout=args.record_timeout)

    async def main() -> None:
        stop = stop_signal_event()
        bus = (await oribus.open_local(args.data_dir, agent="oribus-proxy") if args.data_dir
               else oribus.connect(args.addr, agent="oribus-proxy", tls=args.tls_dir))
        try:
            await serve(bus, config, args.prefix or [""], stop=stop)
        finally:
            await bus.close()

    _run(main())
    return 0


# ---- tools ------------------------------------------------------------------------------


def _cmd_repair(args: argparse.Namespace) -> int:
    import contextlib

    from oribus.datadir_lock import DataDirLock
    from oribus.shards.repair import repair_shard

    data = Path(args.data_dir)
    wal_dirs = sorted(p for p in data.glob("shard-*/wal") if p.is_dir())
    if (data / "wal").is_dir():
        wal_dirs.insert(0, data / "wal")
    if not wal_dirs:
        print(f"no WAL directories under {data}", file=sys.stderr)
        return 2
    # Never under a live process: lock the directory given and each shard's (DataDirLocked).
    with contextlib.ExitStack() as locks:
        for held in sorted({data, *(d.parent for d in wal_dirs)}):
            locks.enter_context(DataDirLock.acquire(held, create=False))
        for d in wal_dirs:
            report = repair_shard(d.parent)
            if args.json:
                _print({"wal_dir": str(d), **report.to_dict()})
                continue
            for a in report.actions:
                print(f"{d}: {a}")
            print(f"{d}: {report.summary()}")
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    from oribus.checker import HistoryError, check, read_history

    try:
        report = check(read_history(args.history), validated=True)
    except HistoryError as e:
        print(f"oribus check: {e}", file=sys.stderr)
        return 2
    if args.json:
        _print(report.to_dict())
    else:
        print(report.summary())
    return 0 if report.ok else 1


def _cmd_certs_init(args: argparse.Namespace) -> int:
    from oribus.certs import DEFAULT_HOSTS, init_certs

    hosts = [h.strip() for h in args.hosts.split(",") if h.strip()]
    for path in init_certs(Path(args.dir), hosts, days=args.days, force=args.force):
        print(f"wrote {path}")
    print(f"server certificate names: {', '.join([*DEFAULT_HOSTS, *hosts])}; client certificate: "
          f"CN oribus-client; valid {args.days} days")
    return 0


def _cmd_certs_agent(args: argparse.Namespace) -> int:
    from oribus.certs import issue_agent_cert

    for path in issue_agent_cert(Path(args.dir), args.agent, args.role, days=args.days, force=args.force):
        print(f"wrote {path}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from oribus.demo import run_demo

    return asyncio.run(run_demo(Path(args.data_dir), shards=args.shards, fresh=not args.keep))


def _cmd_bench(args: argparse.Namespace) -> int:
    # The harness and its peers live in the repository's benchmarks/, outside the package:
    # found next to the package (editable install) or in the current directory.
    import subprocess

    candidates = [Path(__file__).resolve().parents[1] / "benchmarks" / "compare.py",
                  Path.cwd() / "benchmarks" / "compare.py"]
    script = next((c for c in candidates if c.is_file()), None)
    if script is None:
        print("oribus bench: benchmarks/compare.py not found: this oribus is installed without its "
              "repository. Run it from a clone of the repository (`make bench`, or "
              "`pip install -e '.[bench]'` then `oribus bench`).", file=sys.stderr)
        return 2
    env = {**os.environ, "ORIBUS_BENCH_PROG": "oribus bench"}  # its usage line names this command
    return subprocess.call([sys.executable, str(script), *args.bench_args], env=env)


def _cluster_options(p: argparse.ArgumentParser, required: bool = False) -> None:
    from oribus.meta.cluster_meta import DEFAULT_LEASE_TTL

    p.add_argument("--etcd", required=required,
                   help="etcd endpoints (http://HOST:PORT, comma separated): cluster mode")
    p.add_argument("--cluster", default="oribus", help="the cluster's name (its prefix in etcd)")
    p.add_argument("--lease-ttl", type=_positive_int, default=DEFAULT_LEASE_TTL,
                   help="seconds a server's etcd lease outlives its last keep-alive (default: %(default)s); a "
                        "replica group's failover takes about this long, and a shorter one fails over on "
                        "shorter pauses too")


def _auth_cluster_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--etcd", help="etcd endpoints of the cluster (http://HOST:PORT, comma separated)")
    p.add_argument("--cluster", default="oribus", help="the cluster's name (its prefix in etcd)")


def _with_auth_store(args: argparse.Namespace, what: Callable[[EtcdAuthStore], Awaitable[dict[str, object]]]
                     ) -> dict[str, object]:
    """``what(store)`` on the auth data of the cluster ``--etcd``/``--cluster`` name."""
    from oribus.meta.auth_store import EtcdAuthStore
    from oribus.meta.etcd import EtcdMeta

    if not args.etcd:
        from oribus.errors import InvalidRequest

        raise InvalidRequest("--etcd is required")

    async def run() -> dict[str, object]:
        meta = EtcdMeta(args.etcd, args.cluster)
        try:
            store = EtcdAuthStore(meta)
            return {"etcd": store.where, **await what(store)}
        finally:
            await meta.close()

    return dict(_run(run()))


def _auth_push(args: argparse.Namespace) -> dict[str, object]:
    """``oribus auth push``: D checked whole first (nothing is written if any of it is bad)."""
    from oribus.auth.keys import AuthDir
    from oribus.auth.published import dir_push

    push = dir_push(AuthDir(Path(args.dir)))

    async def what(store: EtcdAuthStore) -> dict[str, object]:
        return dict(await store.push(push))

    return _with_auth_store(args, what)


def _auth_revoke_in_etcd(args: argparse.Namespace) -> dict[str, object]:
    async def what(store: EtcdAuthStore) -> dict[str, object]:
        return {"until": await store.revoke(args.token_id, args.until or 0, time.time())}

    return _with_auth_store(args, what)


def _history_store_option(p: argparse.ArgumentParser) -> None:
    from oribus.shards.config import DEFAULT_HISTORY_STORE, HISTORY_STORES

    p.add_argument("--history-store", choices=HISTORY_STORES, default=DEFAULT_HISTORY_STORE,
                   help="where each shard keeps the versions older than a key's current one: in memory, or "
                        "in an LMDB file below the shard's directory (unreplicated shards only; a directory "
                        "that has one must be opened with lmdb) (default: %(default)s)")


def _history_retention_options(p: argparse.ArgumentParser) -> None:
    """``--history-versions`` and ``--history-max-age``: what each shard keeps of a key's versions
    (specs/engine.md "Retention")."""
    from oribus.types import DEFAULT_HISTORY_LIMIT

    p.add_argument("--history-versions", type=_positive_int, default=DEFAULT_HISTORY_LIMIT, metavar="N",
                   help="versions each shard keeps per key, the current one included (history, rollback "
                        "and watch reach); older ones are dropped as new ones come (default: %(default)s)")
    p.add_argument("--history-max-age", type=_duration, default=None, metavar="DURATION",
                   help="also drop versions committed longer ago than this (90s, 15m, 12h, 7d), in the "
                        "background; a key's current version is always kept (default: no age limit)")


def _allow_empty_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-empty", action="store_true",
                   help="UNSAFE: open a shard whose data is lost (directory, WAL or snapshot gone) from "
                        "what is left, possibly empty, instead of refusing; its lost commits are gone")


def _positive_seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {text}")
    return v


def _seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not v >= 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= 0, not {text}")
    return v


def _read_lease_option(p: argparse.ArgumentParser, *, skew: bool) -> None:
    from oribus.shards.config import DEFAULT_CLOCK_SKEW_SECONDS, DEFAULT_READ_LEASE_SECONDS

    p.add_argument("--read-lease", type=_positive_seconds, default=DEFAULT_READ_LEASE_SECONDS, metavar="SECONDS",
                   help="how long a shard that only validates a commit's reads holds its read locks; a shard "
                        "also takes no write for this long (plus twice the clock skew) after it starts "
                        "(default: %(default)s)")
    if skew:
        p.add_argument("--clock-skew", type=_seconds, default=DEFAULT_CLOCK_SKEW_SECONDS, metavar="SECONDS",
                       help="bound on the difference between this machine's clock and any bus's: a commit "
                            "relying on read locks of other shards is refused this long before their deadline "
                            "(0 when every bus runs on this machine; default: %(default)s)")


def _tls_option(p: argparse.ArgumentParser) -> None:
    if not any(a.dest == "tls_dir" for a in p._actions):
        p.add_argument("--tls-dir", help="mutual TLS: a directory with ca.crt, server.*, client.* "
                                         "(oribus certs init)")


def _shard_transport_option(p: argparse.ArgumentParser) -> None:
    from oribus.rpc.shard_client import DEFAULT_TRANSPORT, TRANSPORTS

    p.add_argument("--shard-transport", choices=TRANSPORTS, default=DEFAULT_TRANSPORT,
                   help="how the bus calls its shards: stream (length-prefixed msgpack over TCP/TLS, "
                        "for shards that advertise a stream listener; the others over gRPC) or grpc "
                        "(default: %(default)s)")


def _client_stream_option(p: argparse.ArgumentParser, *, advertise: bool) -> None:
    """The bus's stream listener for clients (the Python SDK switches to it from gRPC)."""
    where = ("the host of --listen on a free port, or none with --advertise unless --advertise-stream is given"
             if advertise else "the host of --listen on a free port")
    p.add_argument("--stream-listen", metavar="HOST:PORT",
                   help="address of the stream listener clients may use beside gRPC (port 0 picks a free one; "
                        f"'off': none); default: {where}")
    if advertise:
        p.add_argument("--advertise-stream", metavar="HOST:PORT",
                       help="the stream address clients are told to use (default: the bound port on the host "
                            "they reached the bus at)")


def _otel_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--otel", action="store_true",
                   help="export traces of reads and commits over OTLP/HTTP to $OTEL_EXPORTER_OTLP_ENDPOINT "
                        "(default http://localhost:4318; setting the variable turns this on too); needs "
                        "the otel extra: pip install 'oribus[otel]'")


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {n}")
    return n


def _http_options(p: argparse.ArgumentParser) -> None:
    from oribus.gateway import DEFAULT_HTTP, GatewayConfig

    p.add_argument("--http", default=DEFAULT_HTTP,
                   help="HTTP address (S-Bus routes, /v1 API, /metrics, dashboard) as HOST:PORT")
    p.add_argument("--no-http", action="store_true", help="serve gRPC only")
    p.add_argument("--admin", action="store_true",
                   help="enable /admin/* routes and rollback from the dashboard (403 otherwise)")
    p.add_argument("--sbus-max-delta", type=int, default=0,
                   help="S-Bus DeltaTooLarge limit in characters (0: only the value size limit)")
    p.add_argument("--http-allow-origin", action="append", default=[], metavar="ORIGIN",
                   help="a web origin (scheme://host:port, or *) whose pages may call the HTTP API; repeatable")
    p.add_argument("--http-host", action="append", default=[], metavar="NAME",
                   help="a DNS name clients use for the HTTP address (.example.com: and its subdomains; *: any), "
                        "checked against Host when --http is not loopback (loopback names, IPs, names without a "
                        "dot and the machine's name are always accepted); repeatable")
    p.add_argument("--http-max-connections", type=int, default=GatewayConfig.max_connections,
                   help="open HTTP connections; past it new ones get 503 and are closed")
    p.add_argument("--http-mtls", action="store_true",
                   help="with --tls-dir (which makes the gateway serve HTTPS): require a client certificate "
                        "signed by its CA on HTTP too")
    from oribus.bus.sessions import SessionLimits

    caps = SessionLimits()
    for flag, default, what in (("--http-sessions", caps.max_sessions, "in all"),
                                ("--http-sessions-per-agent", caps.max_per_agent, "of one agent name"),
                                ("--http-sessions-per-client", caps.max_per_client, "opened from one client address")):
        p.add_argument(flag, type=_positive_int, default=default, metavar="N",
                       help=f"HTTP agent sessions {what}; past it the most idle one is evicted and its next "
                            "commit fails closed (default: %(default)s)")


def _duration(text: str) -> float:
    """``60``, ``60s``, ``2m``, ``12h``, ``7d``: seconds (``oribus.types.parse_duration``)."""
    from oribus.errors import InvalidRequest
    from oribus.types import parse_duration

    try:
        return parse_duration(text)
    except InvalidRequest as e:
        raise argparse.ArgumentTypeError(e.message) from None


def _pids(text: str) -> list[int]:
    try:
        pids = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--pids takes comma-separated process ids, not {text!r}") from None
    if not pids or any(p <= 1 for p in pids):
        raise argparse.ArgumentTypeError(f"--pids takes comma-separated process ids, not {text!r}")
    return pids


def _cmd_verify(args: argparse.Namespace) -> int:
    from oribus.verify import VerifyConfig, verify

    if (args.addr is None) == (not args.start_local):
        print("oribus verify needs --addr HOST:PORT (a running bus) or --start-local", file=sys.stderr)
        return 2
    if args.nemesis == "local" and not (args.pids or args.start_local):
        print("oribus verify: --nemesis local needs --pids P1,P2,... (processes on this machine) "
              "or --start-local", file=sys.stderr)
        return 2
    if args.replicas > 1 and not args.start_local:
        print("oribus verify: --replicas is for --start-local (a deployment verify starts itself)", file=sys.stderr)
        return 2
    if args.pids and args.nemesis != "local":
        print("oribus verify: --pids is for --nemesis local", file=sys.stderr)
        return 2
    if args.workload in ("agent-step", "both") and args.keys < 3:
        print("oribus verify: the agent-step workload needs --keys 3 or more", file=sys.stderr)
        return 2
    if args.prefix is not None and (not args.prefix or args.prefix.startswith(".sbus/")):
        print(f"oribus verify: --prefix {args.prefix!r} is empty or reserved", file=sys.stderr)
        return 2
    config = VerifyConfig(
        addr=args.addr, http=args.http, tls_dir=args.tls_dir, token=args.token, duration=args.duration,
        clients=args.clients,
        keys=args.keys, workload=args.workload, prefix=args.prefix, out=Path(args.out), seed=args.seed,
        rate=args.rate, keep=args.keep, nemesis=args.nemesis, pids=args.pids or [],
        start_local=args.start_local, replicas=args.replicas,
    )
    return int(_run(verify(config)))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="oribus", description="A state bus for fleets of agents.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log at INFO level (one line per HTTP request, with its commit id)")
    parser.add_argument("--log-json", action="store_true", help="log one JSON object per line")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("up", help="run a bus and its shards on this machine")
    p.add_argument("--data-dir", default="./oribus-data",
                   help="where the bus and its shards keep their data (default: %(default)s)")
    p.add_argument("--listen", default=DEFAULT_BUS_ADDRESS,
                   help="gRPC address of the bus as HOST:PORT (default: %(default)s)")
    p.add_argument("--shards", type=int, default=None,
                   help="shards of a new data directory (default: 1, or one per core with --processes; "
                        "an existing one keeps its own)")
    p.add_argument("--processes", action="store_true",
                   help="run each shard as its own process (a new data directory gets one shard per core)")
    p.add_argument("--replicas", type=int, default=None,
                   help="with --processes: each shard is a replica group of this many member processes (3 or 5), "
                        "elected through etcd and restarted when they die; default: 1 (or what the data "
                        "directory holds)")
    _cluster_options(p)
    _client_stream_option(p, advertise=False)
    _shard_transport_option(p)
    _allow_empty_option(p)
    _history_store_option(p)
    _history_retention_options(p)
    _read_lease_option(p, skew=False)  # one machine, one clock: no skew
    _http_options(p)
    _tls_option(p)
    _auth_option(p)
    _otel_option(p)
    p.set_defaults(fn=_cmd_up)

    p = sub.add_parser("shard", help="run one shard server")
    p.add_argument("--id", required=True, help="the shard id, or 'ordinal' (the host name's -N suffix)")
    p.add_argument("--data-dir", required=True, help="this shard's own directory")
    p.add_argument("--listen", default="127.0.0.1:0",
                   help="gRPC address as HOST:PORT; port 0 picks a free one (default: %(default)s)")
    p.add_argument("--advertise", help="the address other servers reach this one at (default: --listen)")
    p.add_argument("--stream-listen", metavar="HOST:PORT",
                   help="address of the stream listener the bus uses: HOST:PORT (port 0 picks a free one), "
                        "unix:PATH (a Unix-domain socket, for a bus on the same machine) or 'off' (none); "
                        "default: the host of --listen on a free port, or none with --advertise unless "
                        "--advertise-stream is given")
    p.add_argument("--advertise-stream", metavar="HOST:PORT",
                   help="the address the bus reaches the stream listener at (default: as bound, or the host of "
                        "--advertise with the bound port)")
    p.add_argument("--ready-file", help="write the bound address here once serving (the gRPC one, then the "
                                        "stream one on a second line)")
    p.add_argument("--member", type=_int_or_ordinal, metavar="M",
                   help="a replicated cluster (cluster init --replicas 3 or 5): this process's member id in the "
                        "shard's group, or 'ordinal' (the host name's -N suffix: a StatefulSet pod's ordinal) "
                        "(default: the one its data directory names, else the lowest free one)")
    p.add_argument("--claim-wait", type=float,
                   help="seconds to wait for an earlier claim on the id to expire (default 2 x lease TTL + 1)")
    _allow_empty_option(p)
    _history_store_option(p)
    _history_retention_options(p)
    _read_lease_option(p, skew=True)
    p.add_argument("--unsafe-no-fsync", action="store_true",
                   help="TESTING ONLY: acknowledge commits before they reach the disk; a power loss (or a "
                        "crash that loses the page cache) loses them. `oribus verify` tests show it is caught")
    p.add_argument("--parent-fd", type=int, help=argparse.SUPPRESS)  # oribus.lifeline
    _cluster_options(p)
    _tls_option(p)
    _otel_option(p)
    p.set_defaults(fn=_cmd_shard)

    p = sub.add_parser("bus", help="run a bus over shard servers")
    p.add_argument("--listen", default=DEFAULT_BUS_ADDRESS,
                   help="gRPC address of the bus as HOST:PORT (default: %(default)s)")
    p.add_argument("--shards", help="comma-separated shard addresses, shard 0 first (without --etcd); each is "
                                    "the gRPC address, optionally +STREAM_ADDRESS (HOST:7801+HOST:7802)")
    p.add_argument("--advertise", help="gRPC address announced in etcd (default: the bound one)")
    p.add_argument("--advertise-http", help="HTTP address announced in etcd (default: the bound one)")
    p.add_argument("--data-dir", default="./oribus-data/bus",
                   help="the bus's own state, the session journal of HTTP agents (default: %(default)s)")
    _client_stream_option(p, advertise=True)
    _shard_transport_option(p)
    _cluster_options(p)
    _http_options(p)
    _tls_option(p)
    _auth_option(p)
    _otel_option(p)
    p.set_defaults(fn=_cmd_bus)

    def client(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
        p.add_argument("--addr", default=DEFAULT_BUS_ADDRESS, help="the bus's gRPC address (default: %(default)s)")
        p.add_argument("--agent", default="cli",
                       help="the agent name the commands act as (default: %(default)s)")
        p.add_argument("--token", help="the agent's token for a bus run with --auth (default: $ORIBUS_TOKEN)")
        _tls_option(p)
        return p

    p = client("get", "read a key")
    p.add_argument("key")
    p.set_defaults(fn=_cmd_get)
    p = client("put", "write a key (value as JSON)")
    p.add_argument("key")
    p.add_argument("json")
    p.add_argument("--expect", type=int, help="expected current version")
    p.set_defaults(fn=_cmd_put)
    p = client("history", "past versions of a key, newest first")
    p.add_argument("key")
    p.add_argument("--limit", type=int, help="at most this many versions (default: all kept)")
    p.set_defaults(fn=_cmd_history)
    p = client("rollback", "restore a key to the value it had at VERSION")
    p.add_argument("key")
    p.add_argument("version", type=int)
    p.set_defaults(fn=_cmd_rollback)
    p = client("watch", "print committed changes under a prefix")
    p.add_argument("prefix", nargs="?", default="")
    p.add_argument("--from-version", type=int,
                   help="first replay the kept changes after this version, then follow live ones "
                        "(default: live changes only)")
    p.add_argument("--count", type=int, help="stop after this many changes")
    p.set_defaults(fn=_cmd_watch)
    p = client("stats", "counters of the bus and its shards")
    p.set_defaults(fn=_cmd_stats)

    p = sub.add_parser("proxy", help="an LLM-traffic proxy recording the bus keys agents' prompts and answers show")
    p.add_argument("--listen", default="127.0.0.1:7790", help="HOST:PORT to serve on (default: %(default)s)")
    p.add_argument("--upstream", required=True, help="the provider's base URL, e.g. https://api.openai.com")
    bus = p.add_mutually_exclusive_group()
    bus.add_argument("--addr", default=DEFAULT_BUS_ADDRESS, help="the bus's gRPC address (default: %(default)s)")
    bus.add_argument("--data-dir", help="run an embedded engine on this directory instead")
    p.add_argument("--agent-header", default="X-Oribus-Agent", help="the header naming the agent (default: %(default)s)")
    p.add_argument("--key-map", help='JSON file: {"<api key>": "agent" or {"agent": ..., "session": ...}}')
    p.add_argument("--prefix", action="append", help="index only keys under this prefix (repeatable; default: all)")
    p.add_argument("--record-timeout", type=float, default=2.0,
                   help="seconds an answer's end waits for its deliveries to be recorded (default: %(default)s)")
    _tls_option(p)
    p.set_defaults(fn=_cmd_proxy)

    p = sub.add_parser("cluster", help="cluster metadata in etcd")
    csub = p.add_subparsers(dest="cluster_command", required=True)
    p = csub.add_parser("init", help="create the cluster's configuration in etcd (idempotent)")
    p.add_argument("--shards", type=int, required=True)
    p.add_argument("--replicas", type=int, default=1,
                   help="members of each shard's replica group: 1 (a single copy), 3 or 5 (survives the loss "
                        "of 1 or 2 members, disk included); default: %(default)s")
    _cluster_options(p, required=True)
    p.set_defaults(fn=_cmd_cluster_init)

    p = sub.add_parser("check", help="check a recorded history (JSON lines) for consistency anomalies")
    p.add_argument("history", help="the history file (specs/history.md)")
    p.add_argument("--json", action="store_true", help="print the full report as JSON")
    p.set_defaults(fn=_cmd_check)

    p = sub.add_parser("verify", help="check a live deployment's consistency: run workloads under a prefix of "
                                      "its own, check the recorded history, report (exit 0: no anomaly)")
    p.add_argument("--addr", help="the bus's gRPC address, HOST:PORT")
    p.add_argument("--http", metavar="URL", help="the HTTP gateway's base URL (http://HOST:PORT): a quarter "
                                                 "of the clients use the HTTP API")
    p.add_argument("--tls-dir", help="mutual TLS for the gRPC connections (ca.crt, client.crt, client.key)")
    p.add_argument("--token", default=os.environ.get("ORIBUS_TOKEN"),
                   help="for a bus run with --auth: a token allowed to act for any agent (`oribus auth token "
                        "--act-for '*'`), presented by every client (default: $ORIBUS_TOKEN)")
    p.add_argument("--duration", type=_duration, default=60.0, help="how long the workload runs (default: 60s)")
    p.add_argument("--clients", type=_positive_int, default=16, help="concurrent clients (default: %(default)s)")
    p.add_argument("--keys", type=_positive_int, default=12, help="keys per workload (default: %(default)s)")
    p.add_argument("--workload", choices=["list-append", "agent-step", "both"], default="both",
                   help="default: %(default)s")
    p.add_argument("--prefix", help="every key the run touches is under it (default: verify/<run id>/)")
    p.add_argument("--out", default="verify-out", help="where history.jsonl, report.json and report.html go "
                                                      "(default: %(default)s)")
    p.add_argument("--seed", type=int, help="the operation mix and every client's path; the same seed replays "
                                            "them (default: random, printed)")
    p.add_argument("--rate", type=float, default=0.0, help="at most this many transactions per second in all "
                                                          "(default: no limit)")
    p.add_argument("--keep", action="store_true", help="keep the run's keys (default: delete them at the end)")
    p.add_argument("--nemesis", choices=["local"], help="faults while the workload runs: kill -9 and "
                                                        "SIGSTOP/SIGCONT of --pids, on a schedule from --seed")
    p.add_argument("--pids", type=_pids, help="comma-separated pids of this machine's oribus processes, for "
                                              "--nemesis local (killed ones are not restarted)")
    p.add_argument("--start-local", action="store_true",
                   help="start an `oribus up --processes` on free ports in a temporary directory, verify it "
                        "(with --nemesis local: kill -9, pause and restart it) and stop it")
    p.add_argument("--replicas", type=int, choices=(1, 3, 5), default=1,
                   help="with --start-local: run each shard as a replica group of this many members (oribus up "
                        "--replicas, a 3 s lease TTL); --nemesis local then kills a primary and deletes its data, "
                        "pauses a primary past its lease, kills a follower (default: %(default)s)")
    p.set_defaults(fn=_cmd_verify)

    p = sub.add_parser("repair", help="truncate a damaged WAL at its first bad record (keeps .broken copies)")
    p.add_argument("--data-dir", required=True, help="an engine data dir, or one shard's dir")
    p.add_argument("--json", action="store_true", help="print one JSON report per WAL directory")
    p.set_defaults(fn=_cmd_repair)

    p = sub.add_parser("certs", help="certificates for mutual TLS")
    certs = p.add_subparsers(dest="certs_command", required=True)
    p = certs.add_parser("init", help="create a CA, and a server and a client certificate it signs")
    p.add_argument("--dir", required=True, help="where to write ca.crt/key, server.crt/key, client.crt/key")
    p.add_argument("--hosts", default="", help=(
        "comma-separated DNS names (wildcards allowed) and IPs the server certificate also names, "
        "besides localhost, 127.0.0.1 and ::1"))
    p.add_argument("--days", type=int, default=365, help="validity of every certificate")
    p.add_argument("--force", action="store_true", help="replace existing files")
    p.set_defaults(fn=_cmd_certs_init)
    p = certs.add_parser("agent", help="an agent's own client certificate (CN=agent:NAME, OU=role:R): its "
                                       "identity on a bus run with --auth, without a token")
    p.add_argument("--dir", required=True, help="a `certs init` directory (its ca.crt and ca.key sign it)")
    p.add_argument("--agent", required=True)
    p.add_argument("--role", action="append", required=True, help="a role of the bus's policy.yaml (repeatable)")
    p.add_argument("--days", type=int, default=365, help="validity")
    p.add_argument("--force", action="store_true", help="replace existing files")
    p.set_defaults(fn=_cmd_certs_agent)

    from oribus.auth.commands import add_commands as _auth_commands

    _auth_commands(sub, cluster_options=_auth_cluster_options, push=_auth_push, revoke_in_etcd=_auth_revoke_in_etcd)

    p = sub.add_parser("demo", help="run a fleet of agents on the embedded engine, with and without ORI")
    p.add_argument("--data-dir", default="./oribus-data/demo", help="the demo's data (default: %(default)s)")
    p.add_argument("--shards", type=int, default=2, help="shards of the demo's engine (default: %(default)s)")
    p.add_argument("--keep", action="store_true", help="keep the data dir's existing contents")
    p.set_defaults(fn=_cmd_demo)

    # oribus mcp: the options and the server live in oribus/integrations/mcp (extra oribus[mcp])
    from oribus.integrations.mcp.options import add_arguments as _mcp_arguments

    p = sub.add_parser("mcp", help="serve the bus to MCP clients: tools to read, commit, watch (stdio, or --http)")
    _mcp_arguments(p)

    def _cmd_mcp(args: argparse.Namespace) -> int:
        from oribus.integrations.mcp.run import main as serve_mcp

        return serve_mcp(args)

    p.set_defaults(fn=_cmd_mcp)

    # Every argument goes to benchmarks/compare.py as is ("oribus bench --help" prints its help).
    p = sub.add_parser("bench", help="compare oribus with Redis, PostgreSQL and etcd (benchmarks/compare.py)",
                       prefix_chars="+", add_help=False)
    p.add_argument("bench_args", nargs=argparse.REMAINDER)
    p.set_defaults(fn=_cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from oribus.logs import configure

    configure(args.verbose, args.log_json)
    try:
        _tracing(args)
        return args.fn(args)
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # a clear message, not a traceback, for errors users can act on
        from oribus.errors import DataDirLocked, OribusError

        if isinstance(e, DataDirLocked):  # a second server on one directory: refused, one line
            print(f"oribus {args.command}: refused: {e.message}", file=sys.stderr)
            return 3
        if isinstance(e, OribusError):
            print(json.dumps({"error": e.code, "message": e.message, **e.details}, default=_json_default),
                  file=sys.stderr)
            return 1
        if isinstance(e, OSError):  # e.g. the address is taken
            print(f"oribus {args.command}: {e}", file=sys.stderr)
            return 1
        if isinstance(e, ImportError) and "oribus[otel]" in str(e):
            print(f"oribus {args.command}: {e}", file=sys.stderr)
            return 2
        raise
    finally:
        from oribus import tracing

        tracing.shutdown()  # what is buffered is exported before the process ends


def _tracing(args: argparse.Namespace) -> None:
    """A server's spans (``--otel``, or ``OTEL_EXPORTER_OTLP_ENDPOINT`` set): exported over OTLP/HTTP.
    ``--otel`` without the variable sets it to the default collector address, so the shard
    processes ``up --processes`` starts export there too."""
    if args.command not in ("up", "bus", "shard"):
        return
    from oribus import tracing

    if args.otel and not os.environ.get(tracing.ENDPOINT_ENV):
        os.environ[tracing.ENDPOINT_ENV] = "http://localhost:4318"
    service = f"oribus-shard-{args.id}" if args.command == "shard" else f"oribus-{args.command}"
    tracing.enable_from_environment(service, force=args.otel)


if __name__ == "__main__":
    sys.exit(main())
