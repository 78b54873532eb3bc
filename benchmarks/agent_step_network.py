"""Agent-step benchmark through the network SDK, with the correctness audit.

The workload is the one of ``benchmarks/agent_step.py`` (specs/ARCHITECTURE.md,
"Measured costs"): ``--keys`` keys (default 1000) each start at
``{"n": 0}``; ``--clients`` sessions (default 32) loop over one step, a
transaction that reads 3 distinct random keys with one ``get_many``, writes
one of them with its counter plus one and commits; a refused commit
(Conflict) is counted and not retried. Here the clients reach the state bus
over gRPC with ``oribus.connect``, against a real server process:

- ``inproc``: ``oribus up --shards N`` (the bus and in-process shards);
- ``processes``: ``oribus up --shards N --processes`` (the bus in front of
  N shard processes over gRPC).

Each configuration starts the server as a subprocess on a free port with a
fresh data directory (fsync on: the server's defaults), waits until it has
announced itself and answers, runs the clients in this process (uvloop),
then stops the server with SIGTERM (SIGKILL to its process group after 20 s).

Three client layouts are measured:

- ``one``: one ``oribus.connect`` and the 32 sessions made from it with
  ``bus.session(agent=...)``: all calls share one multiplexed stream;
- ``many``: one ``oribus.connect`` per session (32 streams; gRPC carries
  them over one shared TCP connection, as it shares connections among the
  channels of a process to one address);
- ``many-tcp``: as ``many``, each connection with its own TCP connection
  (a local gRPC subchannel pool per channel).

Figures, for the measured window: committed transactions per second,
conflicts, latency of committed transactions (first read to acknowledged
commit: p50/p95/p99), and the wire cost per committed transaction from the
``MuxClient`` counters of the clients' connections: calls, gRPC messages
client→bus and bus→client; between the bus and its shard processes, the calls
per message each way (the shard servers' transport counters, stream or gRPC);
the CPU time per committed transaction of every process together (this one
and the servers, from ``/proc``: robust to other work on the machine, unlike
the rate). Also reported: the WAL group commit and the
1PC/2PC split from the server's ``stats()``, the CPU used by this process and
by the server processes during the window (2 cores: clients and servers
compete for them), the CPU used by everything else on the machine (other
work disturbs the figures: look at this column before trusting a row), the
busiest threads, and the TCP connections open from this process to the bus
(gRPC may share one connection among channels to the same address).

After each run the audit of ``agent_step.py`` checks the state against what
the clients were told, on the live server and again after a restart of the
server on the same data directory (WAL replay): every key's counter equals
its acknowledged commits (so their sum equals the acknowledged total: no lost
update, no double apply, nothing from a refused commit) and every key's
history has consecutive versions written by acknowledged commits.

Usage::

    .venv/bin/python benchmarks/agent_step_network.py [--modes inproc processes]
        [--layouts one many many-tcp] [--shards 2] [--clients 32] [--keys 1000]
        [--duration 10] [--warmup 2] [--json out.json] [--keep] [--shard-transport stream|grpc]
        [--py-spy SECONDS [--py-spy-native]] [--cprofile-server]

``--py-spy SECONDS`` records the server processes with py-spy during the
window (py-spy must be installed and allowed to trace; ``--py-spy-native``
adds C frames, pausing the process at each sample) and prints the top
functions; ``--cprofile-server`` runs the server under cProfile instead (its
whole lifetime, startup and audit included) and prints its top functions.
Profiled runs are slower: their figures are not the benchmark's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import pstats
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from grpc import aio as grpc_aio
from harness.cpu import process_cpu_seconds as cpu_seconds  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from agent_step import (  # noqa: E402
    READS_PER_STEP,
    Window,
    audit,
    client,
    key_name,
    percentile,
    populate,
    wal_totals,
)

import oribus  # noqa: E402
from oribus import AsyncSession, OribusError, Unavailable  # noqa: E402
from oribus.rpc.wire import CHANNEL_OPTIONS  # noqa: E402

try:
    import uvloop
except ImportError:  # the figures are meant to be taken with uvloop; say so when it is missing
    uvloop = None

MODES = ("inproc", "processes")
LAYOUTS = ("one", "many", "many-tcp")
COUNTERS = ("calls", "messages_out", "messages_in")
PY_SPY_RATE = 200  # samples per second


# ---- the server process -------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``oribus up`` as a subprocess in its own process group (its shard processes too)."""

    def __init__(
        self,
        data_dir: Path,
        shards: int,
        processes: bool,
        log_path: Path,
        cprofile_out: Path | None = None,
        shard_transport: str | None = None,
        replicas: int = 1,
        history_store: str | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.history_store = history_store  # None: the server's default (``--history-store``)
        self.replicas = replicas  # > 1: every shard a replica group (up --replicas; a private etcd)
        self.shards = shards
        self.processes = processes
        self.shard_transport = shard_transport  # None: the server's default
        self.log_path = log_path
        self.cprofile_out = cprofile_out
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self._log_offset = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        cmd = [sys.executable]
        if self.cprofile_out is not None:
            cmd += ["-m", "cProfile", "-o", str(self.cprofile_out)]
        cmd += [
            "-m",
            "oribus.cli",
            "up",
            "--data-dir",
            str(self.data_dir),
            "--listen",
            self.address,
            "--shards",
            str(self.shards),
            "--no-http",  # not measured here; its default port may be taken by anything else
        ]
        if self.processes:
            cmd.append("--processes")
            if self.shard_transport:
                cmd += ["--shard-transport", self.shard_transport]
            if self.replicas > 1:
                cmd += ["--replicas", str(self.replicas)]
        if self.history_store:
            cmd += ["--history-store", self.history_store]
        return cmd

    async def start(self, timeout: float = 60.0) -> None:
        """Start the server; return once it answers AND has announced itself.

        ``oribus up`` serves requests before it prints its banner and installs
        its SIGTERM handler (in between it runs a recovery pass over the
        shards): a SIGTERM in that window kills it without a clean shutdown.
        """
        self.port = free_port()
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps it open
        try:
            self.proc = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                start_new_session=True,
            )
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                await self.stop()  # its shard processes may still run
                raise RuntimeError(f"server exited with code {code}:\n{self.log_tail()}")
            if self._announced() and await self._answers():
                return
            if time.monotonic() > deadline:
                await self.stop()
                raise RuntimeError(f"server did not answer within {timeout:g}s:\n{self.log_tail()}")
            await asyncio.sleep(0.1)

    def _announced(self) -> bool:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_offset)
                return b"oribus up: bus on" in f.read()
        except OSError:
            return False

    async def _answers(self) -> bool:
        probe = oribus.connect(self.address, agent="probe", timeout=2.0)
        try:
            await probe.stats()
            return True
        except Unavailable:
            return False
        finally:
            await probe.close()

    def pids(self) -> list[int]:
        """The server process and the processes of its group (the shard processes)."""
        if self.proc is None:
            return []
        pgid = self.proc.pid
        found = [pgid]
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == pgid:
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid:  # field 5 of stat: process group
                found.append(int(entry))
        return found

    async def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM (graceful: drain, fsync, close), SIGKILL to the group after ``timeout``."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        loop = asyncio.get_running_loop()
        try:
            code = await loop.run_in_executor(None, proc.wait, timeout)
        except subprocess.TimeoutExpired:
            print(f"  server {proc.pid} ignored SIGTERM for {timeout:g}s: SIGKILL", flush=True)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            code = await loop.run_in_executor(None, proc.wait)
        # Shard processes left behind (e.g. the server failed half-way) are ended too.
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            for _ in range(50):
                await asyncio.sleep(0.1)
                try:
                    os.killpg(proc.pid, 0)
                except ProcessLookupError:
                    break
        self.proc = None
        return code

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def thread_cpu(pids: list[int]) -> dict[str, float]:
    """CPU seconds per thread of ``pids``, keyed ``pid/tid name``."""
    out = {}
    tck = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                with open(f"/proc/{pid}/task/{tid}/comm") as f:
                    name = f.read().strip()
            except OSError:
                continue
            out[f"{pid}/{tid} {name}"] = (int(fields[11]) + int(fields[12])) / tck
    return out


def busiest_threads(
    before: dict[str, float], after: dict[str, float], seconds: float, top: int = 8
) -> list[str]:
    rows = sorted(((after[k] - before.get(k, 0.0)) / seconds, k) for k in after)
    return [f"{v:.0%} {k}" for v, k in reversed(rows[-top:]) if v >= 0.01]


def machine_busy_seconds() -> float:
    """CPU seconds all processes of the machine have used (busy time of every CPU)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def tcp_connections_to(port: int) -> int:
    """Established TCP connections to 127.0.0.1:``port`` (counted at their client ends)."""
    n = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    if int(parts[2].rsplit(":", 1)[1], 16) == port and parts[3] == "01":
                        n += 1
        except OSError:
            continue
    return n


# ---- one run ---------------------------------------------------------------------------


@dataclass
class RunConfig:
    mode: str  # "inproc" or "processes"
    layout: str  # "one" connection or "many" (one per session)
    shards: int
    clients: int
    keys: int
    duration: float
    warmup: float
    seed: int
    py_spy: float = 0.0  # seconds of py-spy recording of the server during the window
    py_spy_native: bool = False  # with native (C) frames
    cprofile: bool = False
    shard_transport: str | None = None  # processes: --shard-transport of oribus up (None: its default)


@dataclass
class RunResult:
    mode: str
    layout: str
    shards: int
    clients: int
    keys: int
    connections: int  # oribus.connect calls carrying the sessions
    tcp_connections: int  # TCP connections from this process to the bus during the window
    duration: float
    committed: int
    conflicts: int
    committed_per_s: float
    conflicts_per_s: float
    conflict_rate: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    calls_per_tx: float  # SDK calls per committed transaction
    msgs_out_per_tx: float  # gRPC messages client→bus per committed transaction
    msgs_in_per_tx: float  # gRPC messages bus→client per committed transaction
    calls_per_msg_out: float  # calls batched into one client→bus message
    shard_calls_per_msg: float  # bus→shard: calls per message the shards received (0: in-process)
    shard_replies_per_msg: float  # shard→bus: replies per message the shards sent
    shard_transport: str  # how the bus reached its shard processes ("stream", "grpc", "" in-process)
    cpu_ms_per_tx: float  # CPU milliseconds per committed transaction, every process together
    wal_fsyncs: int
    records_per_fsync: float
    wal_records_per_tx: float  # WAL records (all shards) per committed transaction
    fsyncs_per_tx: float
    commits_1pc: int
    commits_2pc: int
    client_cpu: float  # CPU seconds of this process per second of window
    server_cpu: dict[str, float]  # CPU seconds per second of window, per server process
    other_cpu: float  # CPU per second used by everything else on the machine (noise)
    errors: int
    total_acked: int
    audit_ok: bool
    audit_problems: list[str] = field(default_factory=list)
    threads: list[str] = field(default_factory=list)  # busiest threads (server and this process)
    restart_seconds: float = 0.0
    load_average: float = 0.0
    profile: str = ""

    @property
    def server_cpu_ms_per_tx(self) -> float:
        """CPU milliseconds of the server processes (bus and shards) per committed transaction."""
        return sum(self.server_cpu.values()) / self.committed_per_s * 1e3 if self.committed_per_s else 0.0


def counters_of(sessions: list[AsyncSession]) -> dict[str, int]:
    """The MuxClient counters summed over the distinct connections of ``sessions``."""
    muxes = {id(s._bus.mux): s._bus.mux for s in sessions}  # noqa: SLF001 - the SDK exposes no accessor
    return {c: sum(m.counters[c] for m in muxes.values()) for c in COUNTERS}


def shard_links(stats: dict) -> tuple[str, dict[str, int]]:
    """(transport, summed counters) of the shard servers' listeners: the one that carried calls."""
    totals: dict[str, dict[str, int]] = {}
    for shard in stats["shards"]:
        for name, counters in (shard.get("transport") or {}).items():
            t = totals.setdefault(name, {})
            for k, v in counters.items():
                t[k] = t.get(k, 0) + int(v)
    if not totals:
        return "", {}
    name = max(totals, key=lambda n: totals[n].get("calls", 0))
    return name, totals[name]


def server_cpu(server: Server) -> dict[int, float]:
    return {pid: cpu_seconds(pid) for pid in server.pids()}


async def py_spy_record(
    pids: list[int], seconds: float, out_dir: Path, native: bool = False
) -> str:
    """Sample each server process with py-spy for ``seconds``; a short top-functions text."""
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(exe).exists():
        return "py-spy not found (pip install py-spy)"
    procs = []
    for pid in pids:
        out = out_dir / f"py-spy-{pid}.txt"
        procs.append(
            (
                pid,
                out,
                await asyncio.create_subprocess_exec(
                    exe,
                    "record",
                    "--pid",
                    str(pid),
                    "--duration",
                    str(int(seconds)),
                    "--rate",
                    str(PY_SPY_RATE),
                    "--format",
                    "raw",
                    "--output",
                    str(out),
                    *(["--native"] if native else ["--nonblocking"]),
                    stdout=asyncio.subprocess.DEVNULL,
                    stderr=asyncio.subprocess.PIPE,
                ),
            )
        )
    texts = []
    for pid, out, p in procs:
        _, err = await p.communicate()
        if p.returncode != 0 or not out.exists():
            texts.append(f"py-spy on {pid} failed: {err.decode(errors='replace').strip()[-300:]}")
            continue
        texts.append(summarise_collapsed(pid, out, int(seconds), PY_SPY_RATE))
    return "\n".join(texts)


def summarise_collapsed(pid: int, path: Path, seconds: float, rate: int, top: int = 20) -> str:
    """Top functions of a py-spy raw (collapsed-stack) file, lines of one function merged.

    Shares are of ``seconds`` of one thread: 100% is one thread running the
    whole time (threads waiting in the kernel, e.g. for epoll, are not sampled).
    """
    inclusive: dict[str, int] = {}
    own: dict[str, int] = {}
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")]
        for f in set(frames):
            inclusive[f] = inclusive.get(f, 0) + n
        own[frames[-1]] = own.get(frames[-1], 0) + n
    possible = max(seconds * rate, 1)
    lines = [
        f"py-spy, server process {pid}: {total} active samples in {seconds:g}s at {rate}/s "
        f"({total / possible:.0%} of one thread, all threads together)"
    ]
    for title, table in (("inclusive", inclusive), ("own", own)):
        lines.append(f"  top {top} by {title} samples (share of one thread's time):")
        for name, n in sorted(table.items(), key=lambda kv: kv[1], reverse=True)[:top]:
            lines.append(f"    {n / possible:6.1%}  {name[:150]}")
    return "\n".join(lines)


def summarise_cprofile(path: Path, top: int = 30) -> str:
    if not path.exists():
        return f"no cProfile output at {path}"
    stream = __import__("io").StringIO()
    stats = pstats.Stats(str(path), stream=stream)
    stats.strip_dirs().sort_stats("tottime").print_stats(top)
    return stream.getvalue()


def own_tcp_connection(session: AsyncSession) -> None:
    """Make the session's connection open its own TCP connection.

    gRPC shares one TCP connection among the channels of a process that go to
    the same address with the same options (a global subchannel pool), so 32
    ``oribus.connect`` calls are 32 streams over ONE TCP connection. A local
    subchannel pool per channel gives each its own. The SDK takes no channel
    options, so the benchmark replaces the (private) channel factory.
    """
    mux = session._bus.mux  # noqa: SLF001

    def open_channel() -> grpc_aio.Channel:
        options = [*CHANNEL_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]
        return grpc_aio.insecure_channel(mux.target, options=options)

    mux._open_channel = open_channel  # noqa: SLF001


async def open_sessions(
    address: str, layout: str, clients: int
) -> tuple[list[AsyncSession], list[AsyncSession]]:
    """(sessions for the clients, connections to close)."""
    if layout == "one":
        conn = oribus.connect(address, agent="fleet")
        return [conn.session(agent=f"agent-{i}") for i in range(clients)], [conn]
    conns = [oribus.connect(address, agent=f"agent-{i}") for i in range(clients)]
    if layout == "many-tcp":
        for c in conns:
            own_tcp_connection(c)
    return conns, conns


async def run_one(cfg: RunConfig, work: Path) -> RunResult:
    data_dir = work / "data"
    server = Server(
        data_dir,
        cfg.shards,
        cfg.mode == "processes",
        work / "server.log",
        cprofile_out=work / "server.prof" if cfg.cprofile else None,
        shard_transport=cfg.shard_transport,
    )
    keys = [key_name(i) for i in range(cfg.keys)]
    w = Window(cfg.keys)
    await server.start()
    admin: AsyncSession | None = None
    conns: list[AsyncSession] = []
    profile = ""
    try:
        admin = oribus.connect(server.address, agent="loader")
        populate_ids = await populate(admin, keys)
        sessions, conns = await open_sessions(server.address, cfg.layout, cfg.clients)
        tasks = [
            asyncio.create_task(
                client(s, keys, random.Random(cfg.seed * 1_000_003 + i), "get_many", None, w)
            )
            for i, s in enumerate(sessions)
        ]
        await asyncio.sleep(cfg.warmup)

        stats0 = await admin.stats()
        spy = None
        if cfg.py_spy > 0:
            spy = asyncio.create_task(
                py_spy_record(server.pids(), min(cfg.py_spy, cfg.duration), work, cfg.py_spy_native)
            )
        srv0 = server_cpu(server)
        thr0 = thread_cpu([*server.pids(), os.getpid()])
        me0 = sum(os.times()[:2])
        all0 = machine_busy_seconds()
        n0 = counters_of(sessions)
        w.measuring = True
        started = time.perf_counter()
        await asyncio.sleep(cfg.duration / 2)
        tcp = tcp_connections_to(server.port)
        await asyncio.sleep(cfg.duration / 2)
        w.measuring = False
        measured = time.perf_counter() - started
        n1 = counters_of(sessions)
        me1 = sum(os.times()[:2])
        all1 = machine_busy_seconds()
        srv1 = server_cpu(server)
        thr1 = thread_cpu([*server.pids(), os.getpid()])
        bus_pid = server.proc.pid if server.proc is not None else 0
        load_average = os.getloadavg()[0]
        stats1 = await admin.stats()
        if spy is not None:
            profile = await spy

        w.stopping = True
        await asyncio.gather(*tasks)
        problems = await audit(admin, keys, w, populate_ids, "live")
    finally:
        for c in conns:
            await c.close()
        if admin is not None:
            await admin.close()
        code = await server.stop()
    if code not in (0, None):
        problems.append(f"server exited with code {code} on SIGTERM:\n{server.log_tail()}")
    if cfg.cprofile:
        profile = summarise_cprofile(work / "server.prof")
        server.cprofile_out = None

    # Durability: restart the server on the same data; everything acknowledged must be back.
    t0 = time.perf_counter()
    await server.start()
    restart_seconds = time.perf_counter() - t0
    try:
        reopened = oribus.connect(server.address, agent="loader")
        try:
            problems += await audit(reopened, keys, w, populate_ids, "restarted")
        finally:
            await reopened.close()
    finally:
        code = await server.stop()
    if code not in (0, None):
        problems.append(
            f"restarted server exited with code {code} on SIGTERM:\n{server.log_tail()}"
        )
    if w.errors:
        problems.insert(
            0,
            f"{len(w.errors)} commits failed with an error (outcome unknown), first: {w.errors[0]}",
        )

    f0, r0, _ = wal_totals(stats0)
    f1, r1, _ = wal_totals(stats1)
    c0, c1 = stats0["coordinator"], stats1["coordinator"]
    lat = sorted(w.latencies)
    attempts = w.committed + w.conflicts
    per = max(w.committed, 1)
    d = {c: n1[c] - n0[c] for c in COUNTERS}
    names = {pid: ("bus" if pid == bus_pid else f"shard-{pid}") for pid in srv1}
    link, l1 = shard_links(stats1)
    _, l0 = shard_links(stats0)
    link_calls = l1.get("calls", 0) - l0.get("calls", 0)
    link_in = l1.get("messages_in", 0) - l0.get("messages_in", 0)
    link_out = l1.get("messages_out", 0) - l0.get("messages_out", 0)
    cpu_all = (me1 - me0) + sum(srv1[p] - srv0.get(p, 0.0) for p in srv1)
    return RunResult(
        mode=cfg.mode,
        layout=cfg.layout,
        shards=cfg.shards,
        clients=cfg.clients,
        keys=cfg.keys,
        connections=len(conns),
        tcp_connections=tcp,
        duration=measured,
        committed=w.committed,
        conflicts=w.conflicts,
        committed_per_s=w.committed / measured,
        conflicts_per_s=w.conflicts / measured,
        conflict_rate=w.conflicts / attempts if attempts else 0.0,
        p50_ms=percentile(lat, 50) * 1e3,
        p95_ms=percentile(lat, 95) * 1e3,
        p99_ms=percentile(lat, 99) * 1e3,
        mean_ms=(sum(lat) / len(lat) * 1e3) if lat else 0.0,
        calls_per_tx=d["calls"] / per,
        msgs_out_per_tx=d["messages_out"] / per,
        msgs_in_per_tx=d["messages_in"] / per,
        calls_per_msg_out=d["calls"] / d["messages_out"] if d["messages_out"] else 0.0,
        shard_calls_per_msg=link_calls / link_in if link_in else 0.0,
        shard_replies_per_msg=link_calls / link_out if link_out else 0.0,
        shard_transport=link if cfg.mode == "processes" else "",
        cpu_ms_per_tx=cpu_all / per * 1e3,
        wal_fsyncs=f1 - f0,
        records_per_fsync=(r1 - r0) / (f1 - f0) if f1 > f0 else 0.0,
        wal_records_per_tx=(r1 - r0) / per,
        fsyncs_per_tx=(f1 - f0) / per,
        commits_1pc=c1["commits_1pc"] - c0["commits_1pc"],
        commits_2pc=c1["commits_2pc"] - c0["commits_2pc"],
        client_cpu=(me1 - me0) / measured,
        other_cpu=max(
            0.0,
            ((all1 - all0) - (me1 - me0) - sum(srv1[p] - srv0.get(p, 0.0) for p in srv1))
            / measured,
        ),
        server_cpu={names[p]: (srv1[p] - srv0.get(p, 0.0)) / measured for p in sorted(srv1)},
        errors=len(w.errors),
        total_acked=sum(w.acked),
        audit_ok=not problems,
        audit_problems=problems,
        threads=busiest_threads(thr0, thr1, measured),
        restart_seconds=restart_seconds,
        load_average=load_average,
        profile=profile,
    )


def run_fresh(cfg: RunConfig, base: Path | None, keep: bool) -> RunResult:
    """One configuration with a new data directory and server, on uvloop when available."""
    work = Path(tempfile.mkdtemp(prefix=f"agent-step-net-{cfg.mode}-{cfg.layout}-", dir=base))
    try:
        factory = uvloop.new_event_loop if uvloop is not None else None
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(run_one(cfg, work))
    finally:
        if keep:
            print(f"  kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


# ---- output ------------------------------------------------------------------------------

COLUMNS = [  # title, format, RunResult field (None: computed in row_cells)
    ("server", "{}", "mode"),
    ("layout", "{}", "layout"),
    ("conns", "{}", None),
    ("commit/s", "{:.0f}", "committed_per_s"),
    ("confl/s", "{:.0f}", "conflicts_per_s"),
    ("confl%", "{:.1%}", "conflict_rate"),
    ("p50 ms", "{:.2f}", "p50_ms"),
    ("p95 ms", "{:.2f}", "p95_ms"),
    ("p99 ms", "{:.2f}", "p99_ms"),
    ("calls/tx", "{:.2f}", "calls_per_tx"),
    ("out/tx", "{:.2f}", "msgs_out_per_tx"),
    ("in/tx", "{:.2f}", "msgs_in_per_tx"),
    ("calls/msg", "{:.1f}", "calls_per_msg_out"),
    ("b>s calls/msg", "{}", None),
    ("cpu ms/tx", "{:.2f}", "cpu_ms_per_tx"),
    ("rec/tx", "{:.2f}", "wal_records_per_tx"),
    ("fsync/tx", "{:.2f}", "fsyncs_per_tx"),
    ("rec/fsync", "{:.1f}", "records_per_fsync"),
    ("2pc%", "{:.0%}", None),
    ("cpu cli", "{:.0%}", "client_cpu"),
    ("cpu srv", "{}", None),
    ("cpu other", "{:.0%}", "other_cpu"),
    ("srv ms/tx", "{:.2f}", "server_cpu_ms_per_tx"),
    ("audit", "{}", None),
]


def row_cells(r: RunResult) -> list[str]:
    cells = []
    for title, fmt, attr in COLUMNS:
        if title == "conns":
            value: Any = f"{r.connections}/{r.tcp_connections}"
        elif title == "2pc%":
            total = r.commits_1pc + r.commits_2pc
            value = r.commits_2pc / total if total else 0.0
        elif title == "b>s calls/msg":
            value = (f"{r.shard_transport} {r.shard_calls_per_msg:.1f}/{r.shard_replies_per_msg:.1f}"
                     if r.shard_transport else "-")
        elif title == "cpu srv":
            value = "+".join(f"{v:.0%}" for v in r.server_cpu.values())
        elif title == "audit":
            value = "ok" if r.audit_ok else "FAIL"
        else:
            value = getattr(r, attr)
        cells.append(fmt.format(value))
    return cells


def print_table(results: list[RunResult]) -> None:
    rows = [[title for title, _, _ in COLUMNS]] + [row_cells(r) for r in results]
    widths = [max(len(row[c]) for row in rows) for c in range(len(COLUMNS))]
    for row in rows:
        print("  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True)))
    print(
        "conns: oribus.connect calls carrying the sessions / TCP connections from this process to "
        "the bus (the audit's own connection included); out/in: gRPC messages client->bus / bus->client; "
        "b>s calls/msg: bus->shard transport, calls per message bus->shard / replies per message shard->bus; "
        "cpu ms/tx: CPU milliseconds per committed transaction of every process together (clients and servers); "
        "rec/tx: WAL records per committed transaction (all shards); "
        "cpu: CPU seconds per second of window (cpu srv: bus process + shard processes; "
        "cpu other: the rest of the machine, kernel included: other work disturbs the figures); "
        "srv ms/tx, all ms/tx: CPU milliseconds per committed transaction of the server processes, "
        "and of the servers and the clients together (from /proc: robust to other work on the machine)"
    )
    for r in results:
        status = "ok" if r.audit_ok else "FAILED"
        print(
            f"audit {r.mode}/{r.layout}: {status}: {r.total_acked} commits acknowledged "
            f"(warm-up included); counters and histories checked live and after a server restart "
            f"(restart {r.restart_seconds:.2f}s)"
        )
        for p in r.audit_problems:
            print(f"    {p}")
    print(
        f"\nbusiest threads during the window (CPU per second; this process is pid {os.getpid()}):"
    )
    for r in results:
        print(f"  {r.mode}/{r.layout}: " + ", ".join(r.threads))
    for r in results:
        if r.profile:
            print(f"\n==== server profile, {r.mode}/{r.layout} ====\n{r.profile}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=MODES,
        default=list(MODES),
        help="server layouts: inproc (oribus up), processes (oribus up --processes)",
    )
    parser.add_argument(
        "--layouts",
        nargs="+",
        choices=LAYOUTS,
        default=list(LAYOUTS),
        help="one connection for all sessions, or one connection per session",
    )
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--clients", type=int, default=32, help="concurrent sessions")
    parser.add_argument("--keys", type=int, default=1000)
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds run before measuring")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--dir", type=Path, default=None, help="where to create work directories")
    parser.add_argument(
        "--keep", action="store_true", help="keep the work directories (data, server log)"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument(
        "--py-spy",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="record the server processes with py-spy for this long in the window",
    )
    parser.add_argument(
        "--py-spy-native", action="store_true", help="with --py-spy: include native (C) frames"
    )
    parser.add_argument(
        "--shard-transport",
        choices=("stream", "grpc"),
        default=None,
        help="processes: how the bus calls its shard processes (default: oribus up's own default)",
    )
    parser.add_argument(
        "--cprofile-server",
        action="store_true",
        help="run the server under cProfile and print its top functions",
    )
    args = parser.parse_args()
    if args.keys < READS_PER_STEP or args.clients < 1 or args.duration <= 0 or args.warmup < 0:
        parser.error("need keys >= 3, clients >= 1, duration > 0 and warmup >= 0")

    loop_name = (
        f"uvloop {uvloop.__version__}" if uvloop is not None else "asyncio (uvloop not installed!)"
    )
    profiled = args.py_spy > 0 or args.cprofile_server
    print(
        f"agent-step over the network: {args.clients} sessions, {args.keys} keys, read 3 (get_many) / "
        f"write 1 per transaction, {args.shards} shards, warm-up {args.warmup:g}s, window {args.duration:g}s, "
        f"fsync on, clients on {loop_name}, Python {platform.python_version()}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    results: list[RunResult] = []
    for mode in args.modes:
        for layout in args.layouts:
            cfg = RunConfig(
                mode,
                layout,
                args.shards,
                args.clients,
                args.keys,
                args.duration,
                args.warmup,
                args.seed,
                py_spy=args.py_spy,
                py_spy_native=args.py_spy_native,
                cprofile=args.cprofile_server,
                shard_transport=args.shard_transport,
            )
            print(f"  running {mode}, layout {layout} ...", flush=True)
            try:
                results.append(run_fresh(cfg, args.dir, args.keep))
            except (OribusError, RuntimeError) as e:
                print(f"  {mode}/{layout} failed: {type(e).__name__}: {e}", flush=True)
    print()
    if profiled:
        print("(profiled runs: the profiler slows the server, these are not benchmark figures)")
    print_table(results)

    if args.json is not None:
        doc = {
            "workload": "agent-step",
            "transport": "network SDK (oribus.connect, gRPC)",
            "loop": loop_name,
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "fsync": True,
            "warmup": args.warmup,
            "profiled": profiled,
            "results": [{**asdict(r), "server_cpu_ms_per_tx": r.server_cpu_ms_per_tx} for r in results],
        }
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    if len(results) < len(args.modes) * len(args.layouts) or not all(r.audit_ok for r in results):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
