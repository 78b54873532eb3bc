"""Redis 7: WATCH the keys read, GET them, then MULTI / SET / EXEC.

Started from the Debian ``redis-server`` binary (installed with apt-get when
missing and the harness runs as root) on a free loopback port, its data in
the run's directory::

    redis-server --port P --bind 127.0.0.1 --dir DIR --appendonly yes
                 --appendfsync always|everysec --save "" --protected-mode no

Durability: the append-only file is the only persistence (RDB snapshots off).
``appendfsync always`` fsyncs the AOF before EXEC is answered (durable);
``everysec`` fsyncs once a second, so up to a second of acknowledged commits
can be lost on a crash of the machine: that row is marked not durable.

The client is redis-py's asyncio API with the hiredis reply parser (the ``bench`` extra
installs it; ``parser="python"`` selects redis-py's own, which costs the client about a
fifth more CPU per step: the comparison must not flatter oribus by slowing its peer), one
pooled connection per worker. The step: ``WATCH`` the
keys read, ``MGET`` them, ``MULTI``, ``SET`` each written key, ``EXEC``. EXEC
answers nil (redis-py raises ``WatchError``) when any watched key was
modified after WATCH: that is a conflict and nothing was written. Three
round trips per step (WATCH, MGET, MULTI..EXEC pipelined).

``unsafe_skip_watch`` drops the WATCH: the audit must then find lost updates
(it exists for the harness's own test, never for a benchmark row).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from pathlib import Path

from peers.base import (
    Backend,
    BackendUnavailable,
    Client,
    Outcome,
    ServerProcess,
    decode_value,
    encode_value,
    free_port,
    padding,
    require_binary,
    version_of,
)

POPULATE_BATCH = 1000  # keys per MSET
AUDIT_BATCH = 5000  # keys per MGET


class RedisClient(Client):
    def __init__(self, redis, unsafe_skip_watch: bool = False) -> None:
        self.redis = redis
        self.unsafe_skip_watch = unsafe_skip_watch

    async def step(self, read_keys: Sequence[str], write_keys: Sequence[str], session: int) -> Outcome:
        from redis.exceptions import WatchError

        async with self.redis.pipeline(transaction=True) as pipe:
            if not self.unsafe_skip_watch:
                await pipe.watch(*read_keys)  # the pipeline is now in immediate mode
                raw = await pipe.mget(read_keys)
            else:
                raw = await self.redis.mget(read_keys)
                await asyncio.sleep(0)  # let other clients interleave, as a network hop would
            values = {k: decode_value(v) for k, v in zip(read_keys, raw, strict=True)}
            seen = {k: n for k, (n, _) in values.items()}
            pipe.multi()
            written = {}
            for k in write_keys:
                n, pad = values[k]
                written[k] = n + 1
                pipe.set(k, encode_value(n + 1, pad))
            sent = time.perf_counter()
            try:
                await pipe.execute()
            except WatchError:
                return Outcome(False, seen, {}, sent)
        return Outcome(True, seen, written, sent)

    async def read(self, keys: Sequence[str], session: int) -> dict[str, int]:
        raw = await self.redis.mget(list(keys))  # one command: atomic
        return {k: decode_value(v)[0] for k, v in zip(keys, raw, strict=True)}

    async def close(self) -> None:
        pass  # the connections belong to the backend's pool


class RedisWatch(Backend):
    """``fsync``: "always" (durable) or "everysec" (not durable)."""

    def __init__(self, fsync: str = "always", *, install: bool = True, max_clients: int = 1024,
                 unsafe_skip_watch: bool = False, parser: str = "hiredis") -> None:
        if fsync not in ("always", "everysec"):
            raise ValueError("fsync is 'always' or 'everysec'")
        if parser not in ("hiredis", "python"):
            raise ValueError("parser is 'hiredis' or 'python'")
        self.parser = parser
        self.fsync = fsync
        self.name = (f"redis-{fsync}" + ("-nowatch" if unsafe_skip_watch else "")
                     + ("-pyparser" if parser == "python" else ""))
        self.durable = fsync == "always" and not unsafe_skip_watch
        self.install = install
        self.max_clients = max_clients
        self.unsafe_skip_watch = unsafe_skip_watch
        self.server: ServerProcess | None = None
        self.port = 0
        self.redis = None
        self.binary = ""
        self.command: list[str] = []

    async def start(self, work: Path) -> None:
        try:
            import redis.asyncio as aioredis
            from redis.asyncio import connection
        except ImportError as e:
            raise BackendUnavailable("redis-py is not installed: pip install '.[bench]'") from e
        if self.parser == "hiredis" and not connection.HIREDIS_AVAILABLE:
            raise BackendUnavailable("hiredis is not installed: pip install '.[bench]'")
        parser_class = (connection._AsyncHiredisParser if self.parser == "hiredis"  # noqa: SLF001
                        else connection._AsyncRESP2Parser)  # noqa: SLF001
        self.binary = require_binary("redis-server", "redis-server", self.install)
        work.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.server = ServerProcess(self.name, work / "redis.log")
        self.command = [
            self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(work),
            "--appendonly", "yes", "--appendfsync", self.fsync, "--save", "",
            "--protected-mode", "no", "--daemonize", "no", "--maxclients", str(self.max_clients + 64),
        ]
        self.server.start(self.command)
        await self.server.wait_port(self.port)
        pool = aioredis.BlockingConnectionPool(host="127.0.0.1", port=self.port, parser_class=parser_class,
                                               max_connections=self.max_clients + 8, timeout=60)
        self.redis = aioredis.Redis(connection_pool=pool)
        for _ in range(100):  # "LOADING" while it reads its AOF
            try:
                await self.redis.ping()
                break
            except Exception:  # noqa: BLE001 - any error: not ready yet
                await asyncio.sleep(0.05)

    async def stop(self) -> None:
        if self.redis is not None:
            await self.redis.aclose()
            self.redis = None
        if self.server is not None:
            await self.server.stop()

    async def reset(self) -> None:
        from redis.exceptions import ResponseError

        await self.redis.flushall()
        # Rewrite the AOF so it does not grow across runs; Redis may already be rewriting it
        # on its own (auto-aof-rewrite), which refuses a second one: wait, then ask.
        await self._aof_rewrite_done()
        try:
            await self.redis.bgrewriteaof()
        except ResponseError as e:
            if "in progress" not in str(e):
                raise
        await self._aof_rewrite_done()

    async def _aof_rewrite_done(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = await self.redis.info("persistence")
            if not info.get("aof_rewrite_in_progress") and not info.get("aof_rewrite_scheduled"):
                return
            await asyncio.sleep(0.05)

    async def populate(self, keys: Sequence[str], value_size: int) -> None:
        value = encode_value(0, padding(value_size))
        for i in range(0, len(keys), POPULATE_BATCH):
            await self.redis.mset(dict.fromkeys(keys[i:i + POPULATE_BATCH], value))

    async def client(self) -> Client:
        return RedisClient(self.redis, self.unsafe_skip_watch)

    async def read_counters(self, keys: Sequence[str]) -> list[int | None]:
        out: list[int | None] = []
        for i in range(0, len(keys), AUDIT_BATCH):
            raw = await self.redis.mget(list(keys[i:i + AUDIT_BATCH]))
            out += [None if v is None else decode_value(v)[0] for v in raw]
        return out

    async def describe(self) -> dict:
        cfg = await self.redis.config_get("append*")
        info = await self.redis.info("server")
        return {
            "version": f"Redis {info.get('redis_version')}",
            "binary": version_of([self.binary, "--version"]),
            "mechanism": "WATCH read keys, MGET, MULTI/SET/EXEC (EXEC nil = conflict)"
                         + (" -- WATCH SKIPPED (broken on purpose)" if self.unsafe_skip_watch else ""),
            "durability": {"appendonly": cfg.get("appendonly"), "appendfsync": cfg.get("appendfsync"),
                           "save": (await self.redis.config_get("save")).get("save")},
            "durable": self.durable,
            "command": " ".join(f"'{a}'" if a == "" else a for a in self.command),
            "client": f"redis-py asyncio ({self.parser} reply parser), one pooled connection per worker",
        }
