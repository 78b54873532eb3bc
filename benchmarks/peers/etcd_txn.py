"""etcd 3.4: a Txn whose compares check the mod revision of every key read.

Started from the Debian ``etcd-server`` binary as a one-member cluster on
free loopback ports (client and peer), its data in the run's directory::

    etcd --name bench --data-dir DIR --listen-client-urls http://127.0.0.1:C
         --listen-peer-urls http://127.0.0.1:P ... --quota-backend-bytes 8GiB

Durability: etcd's default — every Raft entry is fsynced to its WAL before
the request is answered (``--unsafe-no-fsync`` is not given; the command
line is recorded in the results). ``reset`` restarts it on an empty data
directory, which also keeps old revisions from piling up across runs.

The step (aetcd, the asyncio v3 client oribus itself uses; one gRPC
channel shared by the workers): one Txn with a range request per key read
(one revision, one round trip), then ``Txn(compare=[mod_revision(k) ==
seen for every k read], success=[put each written key])``. ``succeeded ==
False`` is a conflict: nothing was written.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import urllib.request
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

MAX_TXN_OPS = 128  # etcd's default --max-txn-ops
MAX_TXN_BYTES = 1 << 20  # below the default --max-request-bytes (1.5 MiB)
POPULATE_IN_FLIGHT = 16
AUDIT_PAGE = 10000  # keys per range request ...
AUDIT_PAGE_BYTES = 2 << 20  # ... and at most this much value data (the client takes 4 MiB messages)


class EtcdClient(Client):
    def __init__(self, etcd) -> None:
        from aetcd import rpc

        self.etcd = etcd
        self.rpc = rpc

    async def _range(self, keys: Sequence[str]) -> tuple[dict[str, tuple[int, bytes]], dict[str, int]]:
        rpc = self.rpc
        req = rpc.TxnRequest(success=[rpc.RequestOp(request_range=rpc.RangeRequest(key=k.encode()))
                                      for k in keys])
        resp = await self.etcd.kvstub.Txn(req)
        values: dict[str, tuple[int, bytes]] = {}
        revs: dict[str, int] = {}
        for k, r in zip(keys, resp.responses, strict=True):
            kv = r.response_range.kvs[0]
            values[k] = decode_value(kv.value)
            revs[k] = kv.mod_revision
        return values, revs

    async def step(self, read_keys: Sequence[str], write_keys: Sequence[str], session: int) -> Outcome:
        rpc = self.rpc
        values, revs = await self._range(read_keys)
        seen = {k: n for k, (n, _) in values.items()}
        written = {k: seen[k] + 1 for k in write_keys}
        compare = [rpc.Compare(key=k.encode(), result=rpc.Compare.EQUAL, target=rpc.Compare.MOD,
                               mod_revision=revs[k]) for k in read_keys]
        success = [rpc.RequestOp(request_put=rpc.PutRequest(
            key=k.encode(), value=encode_value(written[k], values[k][1]))) for k in write_keys]
        sent = time.perf_counter()
        resp = await self.etcd.kvstub.Txn(rpc.TxnRequest(compare=compare, success=success))
        if not resp.succeeded:
            return Outcome(False, seen, {}, sent)
        return Outcome(True, seen, written, sent)

    async def read(self, keys: Sequence[str], session: int) -> dict[str, int]:
        values, _ = await self._range(keys)
        return {k: n for k, (n, _) in values.items()}


class EtcdTxn(Backend):
    name = "etcd"

    def __init__(self, *, install: bool = True) -> None:
        self.install = install
        self.server: ServerProcess | None = None
        self.work = Path()
        self.binary = ""
        self.client_port = 0
        self.command: list[str] = []
        self.etcd = None
        self.generation = 0
        self.value_size = 0

    async def start(self, work: Path) -> None:
        try:
            import aetcd  # noqa: F401
        except ImportError as e:
            raise BackendUnavailable("aetcd is not installed") from e
        self.binary = require_binary("etcd", "etcd-server", self.install)
        self.work = work
        work.mkdir(parents=True, exist_ok=True)
        await self._run_server()

    async def _run_server(self) -> None:
        import aetcd

        self.generation += 1
        data = self.work / f"data-{self.generation}"
        self.client_port, peer_port = free_port(), free_port()
        url, peer = f"http://127.0.0.1:{self.client_port}", f"http://127.0.0.1:{peer_port}"
        self.command = [
            self.binary, "--name", "bench", "--data-dir", str(data),
            "--listen-client-urls", url, "--advertise-client-urls", url,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"bench={peer}", "--initial-cluster-state", "new",
            "--quota-backend-bytes", str(8 << 30), "--log-level", "warn",
        ]
        self.server = ServerProcess(self.name, self.work / "etcd.log")
        self.server.start(self.command)
        await self.server.wait_port(self.client_port)
        self.etcd = aetcd.Client(host="127.0.0.1", port=self.client_port, timeout=60)
        await self.etcd.connect()
        for _ in range(200):  # the member elects itself leader shortly after it listens
            try:
                await self.etcd.get(b"probe")
                return
            except Exception:  # noqa: BLE001 - not ready yet
                await asyncio.sleep(0.05)
        raise BackendUnavailable(f"etcd does not answer:\n{self.server.log_tail()}")

    async def stop(self) -> None:
        if self.etcd is not None:
            with contextlib.suppress(Exception):
                await self.etcd.close()
            self.etcd = None
        if self.server is not None:
            await self.server.stop()

    async def reset(self) -> None:
        await self.stop()
        import shutil

        shutil.rmtree(self.work / f"data-{self.generation}", ignore_errors=True)
        await self._run_server()

    async def populate(self, keys: Sequence[str], value_size: int) -> None:
        from aetcd import rpc

        self.value_size = value_size
        value = encode_value(0, padding(value_size))
        per_txn = max(1, min(MAX_TXN_OPS, MAX_TXN_BYTES // (len(value) + 64)))
        batches = [keys[i:i + per_txn] for i in range(0, len(keys), per_txn)]
        sem = asyncio.Semaphore(POPULATE_IN_FLIGHT)

        async def put(batch: Sequence[str]) -> None:
            async with sem:
                ops = [rpc.RequestOp(request_put=rpc.PutRequest(key=k.encode(), value=value)) for k in batch]
                await self.etcd.kvstub.Txn(rpc.TxnRequest(success=ops))

        await asyncio.gather(*(put(b) for b in batches))

    async def client(self) -> Client:
        return EtcdClient(self.etcd)

    async def read_counters(self, keys: Sequence[str]) -> list[int | None]:
        from aetcd import rpc

        # one consistent revision for the whole read, in pages
        got: dict[str, int] = {}
        first = min(keys).encode()
        end = (max(keys) + "\0").encode()
        revision = 0
        page = max(1, min(AUDIT_PAGE, AUDIT_PAGE_BYTES // (self.value_size + 64)))
        while True:
            resp = await self.etcd.kvstub.Range(rpc.RangeRequest(key=first, range_end=end, limit=page,
                                                                 revision=revision))
            revision = revision or resp.header.revision
            for kv in resp.kvs:
                got[kv.key.decode()] = decode_value(kv.value)[0]
            if not resp.more or not resp.kvs:
                break
            first = resp.kvs[-1].key + b"\0"
        return [got.get(k) for k in keys]

    async def _wal_fsyncs(self) -> int:
        """etcd's own count of WAL fsyncs (its /metrics)."""
        url = f"http://127.0.0.1:{self.client_port}/metrics"

        def fetch() -> str:
            with urllib.request.urlopen(url, timeout=10) as r:
                return r.read().decode()

        for line in (await asyncio.to_thread(fetch)).splitlines():
            if line.startswith("etcd_disk_wal_fsync_duration_seconds_count "):
                return int(float(line.split()[1]))
        raise BackendUnavailable("etcd's /metrics has no etcd_disk_wal_fsync_duration_seconds_count")

    async def describe(self) -> dict:
        status = await self.etcd.status()
        before = await self._wal_fsyncs()  # durability read back: a probe write's fsyncs
        await self.etcd.put(b"bench-probe", b"1")
        fsyncs = await self._wal_fsyncs() - before
        return {
            "version": f"etcd {status.version}",
            "binary": version_of([self.binary, "--version"]),
            "mechanism": "Txn of ranges (one revision), then Txn(compare mod_revision == seen for every "
                         "key read, success: put) (succeeded=false = conflict)",
            "durability": {"wal_fsyncs_for_one_commit": fsyncs,
                           "fsync": "every Raft entry fsynced before the answer (etcd default)"},
            "durable": fsyncs >= 1,
            "command": " ".join(self.command),
            "client": "aetcd (grpc.aio), one channel shared by the workers",
        }
