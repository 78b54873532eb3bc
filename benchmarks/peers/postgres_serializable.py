"""PostgreSQL 15: SERIALIZABLE transactions, retried on serialization failure.

Started from the Debian ``postgresql-15`` binaries (``initdb`` then
``postgres`` in the foreground, on a free loopback port, its data in the
run's directory). initdb refuses to run as root, so as root the server runs
as the ``postgres`` system user (created by the Debian package) and the
directory is handed to it::

    initdb -D DIR -U bench -A trust
    postgres -D DIR -c listen_addresses=127.0.0.1 -c port=P -c fsync=on
             -c synchronous_commit=on -c full_page_writes=on
             -c max_connections=... -c shared_buffers=256MB -c deadlock_timeout=20ms

Durability: fsync on, synchronous_commit on: COMMIT returns after the WAL
record is flushed (read back with SHOW and recorded in the results).

The table: ``kv(k text primary key, n bigint, pad bytea)``. The step, on one
connection per worker (psycopg 3 async, pipeline mode: two round trips)::

    BEGIN ISOLATION LEVEL SERIALIZABLE;
    SELECT k, n, pad FROM kv WHERE k = $1 FOR SHARE;           -- per key read, in key order
    SELECT k, n, pad FROM kv WHERE k = $1 FOR NO KEY UPDATE;   -- (for the keys it writes)
    UPDATE kv SET n = n_read + 1, pad = pad_read WHERE k = w;  -- per written key
    COMMIT;

SQLSTATE 40001 (serialization failure) and 40P01 (deadlock) are conflicts.

``read_lock``:

- ``"share"`` (the ``postgres`` row, above): every key read is row-locked
  at the strength it needs (share, or no-key-update for the keys written),
  one statement per key in key order, so no lock is ever upgraded and no two
  steps wait on each other in a cycle. Under SERIALIZABLE a row changed by a
  transaction that committed after this one's snapshot raises 40001 at once,
  and the locks keep the rows read unchanged until COMMIT. That is the
  workload's rule (commit only if every read is still current at commit),
  which SSI alone does not give: it only promises *some* serial order.
- ``"none"`` (the ``postgres-ssi`` row): one plain ``SELECT ... WHERE k =
  ANY(reads)``, SSI decides. A step may then commit after a key it read was
  overwritten by a transaction that committed first (SSI orders it before
  that one): serializable, but not the workload's rule, and the audit
  reports such commits as stale (measured: about 20 in 2 s at the base point).
"""

from __future__ import annotations

import asyncio
import logging
import os
import pwd
import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from peers.base import (
    Backend,
    BackendUnavailable,
    Client,
    Outcome,
    ServerProcess,
    free_port,
    padding,
    require_binary,
    version_of,
)

PG_BIN = Path("/usr/lib/postgresql/15/bin")
DB_USER = "bench"
AUDIT_BATCH = 10000
CONFLICT_STATES = {"40001", "40P01"}  # serialization_failure, deadlock_detected
SELECT_FOR_SHARE = "SELECT k, n, pad FROM kv WHERE k = %s FOR SHARE"
SELECT_FOR_UPDATE = "SELECT k, n, pad FROM kv WHERE k = %s FOR NO KEY UPDATE"

# psycopg logs (at WARNING) the error that ends a pipeline when a conflict aborts it; the
# conflict is counted, the log line is noise.
logging.getLogger("psycopg").setLevel(logging.ERROR)


def pg_binary(name: str, install: bool) -> str:
    if (PG_BIN / name).exists():
        return str(PG_BIN / name)
    found = shutil.which(name)
    if found:
        return found
    require_binary("pg_ctlcluster", "postgresql", install)  # installs postgresql-15
    if (PG_BIN / name).exists():
        return str(PG_BIN / name)
    raise BackendUnavailable(f"{name} not found in {PG_BIN}: install the Debian package postgresql-15")


class PostgresClient(Client):
    def __init__(self, conn, read_lock: str) -> None:
        self.conn = conn
        self.read_lock = read_lock

    async def _select(self, read_keys: Sequence[str], write_keys: Sequence[str]) -> dict[str, tuple]:
        """BEGIN and the reads, in one round trip (pipeline mode)."""
        conn = self.conn
        async with conn.pipeline() as p:
            await conn.execute("BEGIN ISOLATION LEVEL SERIALIZABLE")
            if self.read_lock == "none":
                cursors = [await conn.execute("SELECT k, n, pad FROM kv WHERE k = ANY(%s)", (list(read_keys),))]
            else:
                # One statement per key, in key order, each lock at its final strength: no
                # upgrade from a share lock, no lock-order cycle, so no deadlock between steps.
                cursors = [await conn.execute(SELECT_FOR_UPDATE if k in write_keys else SELECT_FOR_SHARE, (k,))
                           for k in sorted(read_keys)]
            await p.sync()
            values: dict[str, tuple] = {}
            for cur in cursors:
                for k, n, pad in await cur.fetchall():
                    values[k] = (n, pad)
        return values

    async def step(self, read_keys: Sequence[str], write_keys: Sequence[str], session: int) -> Outcome:
        import psycopg

        conn = self.conn
        seen: dict[str, int] = {}
        sent = 0.0
        try:
            values = await self._select(read_keys, write_keys)
            seen = {k: values[k][0] for k in read_keys}
            written = {k: seen[k] + 1 for k in write_keys}
            async with conn.pipeline():
                for k in write_keys:
                    await conn.execute("UPDATE kv SET n = %s, pad = %s WHERE k = %s",
                                       (written[k], values[k][1], k))
                sent = time.perf_counter()
                await conn.execute("COMMIT")
        except psycopg.Error as e:
            if e.sqlstate in CONFLICT_STATES:
                await conn.execute("ROLLBACK")
                return Outcome(False, seen, {}, sent or time.perf_counter())
            raise
        return Outcome(True, seen, written, sent)

    async def read(self, keys: Sequence[str], session: int) -> dict[str, int]:
        cur = await self.conn.execute("SELECT k, n FROM kv WHERE k = ANY(%s)", (list(keys),))
        return dict(await cur.fetchall())  # one statement: one snapshot

    async def close(self) -> None:
        await self.conn.close()


class PostgresSerializable(Backend):
    def __init__(self, read_lock: str = "share", *, install: bool = True, max_clients: int = 300) -> None:
        if read_lock not in ("share", "none"):
            raise ValueError("read_lock is 'share' or 'none'")
        self.read_lock = read_lock
        self.name = "postgres" if read_lock == "share" else "postgres-ssi"
        self.install = install
        self.max_clients = max_clients
        self.server: ServerProcess | None = None
        self.port = 0
        self.data = Path()
        self.user: str | None = None
        self.admin = None  # a connection for populate / reset / audit
        self.command: list[str] = []

    @property
    def dsn(self) -> str:
        return f"host=127.0.0.1 port={self.port} user={DB_USER} dbname=postgres"

    async def start(self, work: Path) -> None:
        try:
            import psycopg  # noqa: F401
        except ImportError as e:
            raise BackendUnavailable("psycopg is not installed: pip install '.[bench]'") from e
        initdb = pg_binary("initdb", self.install)
        self.postgres = pg_binary("postgres", self.install)
        work.mkdir(parents=True, exist_ok=True)
        self.data = work / "pgdata"
        if os.geteuid() == 0:  # initdb and postgres refuse root
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError as e:
                raise BackendUnavailable("running as root and no 'postgres' user to run the server as") from e
            self.user = "postgres"
            os.chmod(work, 0o755)
            os.chown(work, pw.pw_uid, pw.pw_gid)
        out = subprocess.run([initdb, "-D", str(self.data), "-U", DB_USER, "-A", "trust", "-E", "UTF8"],
                             capture_output=True, text=True, user=self.user, cwd=work)
        if out.returncode != 0:
            raise BackendUnavailable(f"initdb failed:\n{out.stdout}\n{out.stderr}")
        await self._run_server()

    async def _run_server(self) -> None:
        import psycopg

        self.port = free_port()
        self.server = ServerProcess(self.name, self.data.parent / "postgres.log")
        if self.user:
            log = self.server.log_path
            log.touch()
            shutil.chown(log, self.user)
        settings = {
            "listen_addresses": "127.0.0.1", "port": self.port,
            "unix_socket_directories": str(self.data.parent),
            "fsync": "on", "synchronous_commit": "on", "full_page_writes": "on",
            "max_connections": self.max_clients + 20, "shared_buffers": "256MB",
            # ordered locking leaves no deadlock between steps; should one occur, find it fast
            "deadlock_timeout": "20ms",
            "max_pred_locks_per_transaction": 256,
        }
        cmd = [self.postgres, "-D", str(self.data)]
        for k, v in settings.items():
            cmd += ["-c", f"{k}={v}"]
        self.command = cmd
        self.server.start(cmd, user=self.user, cwd=self.data.parent)
        await self.server.wait_port(self.port)
        for _ in range(200):  # accepting TCP before it accepts logins
            try:
                self.admin = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True)
                break
            except psycopg.OperationalError:
                await asyncio.sleep(0.05)
        else:
            raise BackendUnavailable(f"postgres does not accept logins:\n{self.server.log_tail()}")

    async def stop(self) -> None:
        if self.admin is not None:
            await self.admin.close()
            self.admin = None
        if self.server is not None:
            import signal

            await self.server.stop(signal.SIGINT)  # "fast" shutdown

    async def reset(self) -> None:
        await self.admin.execute("DROP TABLE IF EXISTS kv")
        await self.admin.execute("CREATE TABLE kv (k text PRIMARY KEY, n bigint NOT NULL, pad bytea NOT NULL)")
        await self.admin.execute("CHECKPOINT")

    async def populate(self, keys: Sequence[str], value_size: int) -> None:
        pad = padding(value_size)
        async with self.admin.cursor() as cur, cur.copy("COPY kv (k, n, pad) FROM STDIN") as copy:
            for k in keys:
                await copy.write_row((k, 0, pad))
        await self.admin.execute("VACUUM ANALYZE kv")

    async def client(self) -> Client:
        import psycopg

        conn = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True, prepare_threshold=0)
        return PostgresClient(conn, self.read_lock)

    async def read_counters(self, keys: Sequence[str]) -> list[int | None]:
        out: list[int | None] = []
        for i in range(0, len(keys), AUDIT_BATCH):
            chunk = list(keys[i:i + AUDIT_BATCH])
            cur = await self.admin.execute("SELECT k, n FROM kv WHERE k = ANY(%s)", (chunk,))
            got = dict(await cur.fetchall())
            out += [got.get(k) for k in chunk]
        return out

    async def describe(self) -> dict:
        shown = {}
        for name in ("server_version", "fsync", "synchronous_commit", "full_page_writes", "wal_sync_method",
                     "max_connections", "shared_buffers", "deadlock_timeout"):
            cur = await self.admin.execute(f"SHOW {name}")
            shown[name] = (await cur.fetchone())[0]
        return {
            "version": f"PostgreSQL {shown.pop('server_version')}",
            "binary": version_of([self.postgres, "--version"]),
            "mechanism": "BEGIN ISOLATION LEVEL SERIALIZABLE; "
                         + ("SELECT ... FOR SHARE (FOR NO KEY UPDATE for the keys written) per key in key "
                            "order" if self.read_lock == "share" else "SELECT ... WHERE k = ANY(reads)")
                         + "; UPDATE; COMMIT (40001/40P01 = conflict)",
            "durability": {k: shown[k] for k in ("fsync", "synchronous_commit", "full_page_writes",
                                                 "wal_sync_method")},
            "settings": {k: shown[k] for k in ("max_connections", "shared_buffers", "deadlock_timeout")},
            "durable": shown["fsync"] == "on" and shown["synchronous_commit"] == "on",
            "command": " ".join(self.command),
            "client": "psycopg 3 async, pipeline mode, one connection per worker",
        }
