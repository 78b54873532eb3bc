"""Real oribus server processes for end-to-end tests: start, wait until serving, kill, stop.

Every process a test starts is a ``ServerProcess``; the test (or its fixture)
stops it by pid in a ``finally``: SIGTERM, then SIGKILL if it does not exit in
time. ``oribus up --processes`` starts shard processes of its own; their pids
are read from /proc once the bus serves, so that they are stopped by pid too
even when the ``up`` process had to be killed.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO = Path(__file__).resolve().parents[2]


def _ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range (what bind to port 0 hands out)."""
    with contextlib.suppress(OSError, ValueError):
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    return 32768


_EPHEMERAL_LOW = _ephemeral_low()
_handed_out: set[int] = set()
_random = random.SystemRandom()  # parallel test runs do not draw the same sequence


def free_port() -> int:
    """A TCP port nobody listens on right now, below the kernel's ephemeral range.

    Not a port 0 the kernel picked: between this call and the server's bind, a process
    binding port 0 (the shard processes of ``up --processes``) or opening a connection could
    be handed that very port. Below the range only another explicit pick can take it, and
    none here repeats one.
    """
    low = max(1024, _EPHEMERAL_LOW - 12_000)
    for _ in range(2_000):
        port = _random.randrange(low, _EPHEMERAL_LOW)
        if port in _handed_out:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free port in {low}..{_EPHEMERAL_LOW - 1}")


def oribus_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "oribus.cli", *args]


def run_cli(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
    """Run one client command of the CLI to completion."""
    return subprocess.run(
        oribus_command(*args), capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


def health_status(address: str, timeout: float = 0.5, tls_dir: Path | None = None) -> int | None:
    """The gRPC health status of the server at ``address`` (None: no answer); over mutual
    TLS with the client certificate of ``tls_dir`` when given."""
    if tls_dir is not None:
        from oribus.tls import TlsConfig, channel_credentials

        channel = grpc.secure_channel(address, channel_credentials(TlsConfig.from_dir(tls_dir)))
    else:
        channel = grpc.insecure_channel(address)
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout
            )
        except grpc.RpcError:
            return None
    return reply.status


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie counts as gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    state = next((line for line in status.splitlines() if line.startswith("State:")), "")
    return "Z" not in state.split()[1:2]


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            out.extend(int(p) for p in (task / "children").read_text().split())
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def shard_pids(data_dir: Path) -> list[int]:
    """Live ``oribus shard`` processes whose command line names ``data_dir`` (those ``up``
    started for it)."""
    return [int(p.name) for p in Path("/proc").iterdir()
            if p.name.isdigit() and "oribus.cli shard " in (cmd := _cmdline(int(p.name)))
            and str(data_dir) in cmd and _alive(int(p.name))]


class ServerProcess:
    """One ``python -m oribus.cli ...`` server; output goes to ``log_path``."""

    def __init__(self, name: str, args: list[str], log_dir: Path, address: str) -> None:
        self.name = name
        self.args = args
        self.address = address
        self.env: dict[str, str] = {}  # extra environment for the next start (e.g. failpoints)
        self.log_path = Path(log_dir) / f"{name}.log"
        self.proc: subprocess.Popen | None = None
        self.children: list[int] = []  # pids of processes it started (``up --processes``)
        self.http_address: str | None = None  # HOST:PORT of its HTTP gateway, if it serves one
        self.tls_dir: Path | None = None  # its --tls-dir: health checks then use mutual TLS
        self.stream_address: str | None = None  # a shard's stream listener, when pinned (``shard``)
        self.starts = 0

    @property
    def shard_address(self) -> str:
        """How ``oribus bus --shards`` names this shard: ``GRPC[+STREAM]``."""
        return f"{self.address}+{self.stream_address}" if self.stream_address else self.address

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> ServerProcess:
        assert self.proc is None or self.proc.poll() is not None, f"{self.name} is already running"
        self.starts += 1
        log = open(self.log_path, "a")  # noqa: SIM115 - handed to the child
        extra = " ".join(f"{k}={v}" for k, v in self.env.items())
        log.write(f"---- start #{self.starts}: {extra} {' '.join(self.args)}\n")
        log.flush()
        try:
            self.proc = subprocess.Popen(
                oribus_command(*self.args),
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                env={**os.environ, **self.env},
            )
        finally:
            log.close()
        return self

    def wait_serving(self, timeout: float = 30.0) -> ServerProcess:
        """Poll the gRPC health service until it answers SERVING; fail if the process dies."""
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"{self.name} exited with code {self.proc.returncode} before serving:\n{self.log_tail()}"
                )
            if health_status(self.address, tls_dir=self.tls_dir) == health_pb2.HealthCheckResponse.SERVING:
                self.children = [p for p in _children(self.pid) if "oribus.cli" in _cmdline(p)]
                return self
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{self.name} not serving on {self.address} after {timeout}s:\n{self.log_tail()}"
                )
            time.sleep(0.05)

    def wait_exit(self, timeout: float = 10.0) -> int:
        """Wait for the process to end by itself (e.g. a failpoint killed it); its exit code."""
        assert self.proc is not None
        return self.proc.wait(timeout)

    def kill9(self) -> None:
        """Crash it: SIGKILL, no chance to flush or drain."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def pause(self) -> None:
        """SIGSTOP: the process stops answering but keeps its sockets and state (a long GC
        pause, a stalled VM)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, grace: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after ``grace`` seconds; then the same for its children. Idempotent."""
        code = None
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGCONT)  # a paused process cannot handle SIGTERM
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(grace)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(10)
            code = self.proc.returncode
        for pid in self.children:
            _stop_pid(pid, grace)
        return code

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def _stop_pid(pid: int, grace: float) -> None:
    """Stop a process we did not Popen ourselves (an ``up`` shard) by pid, if it is still ours."""
    if not _alive(pid) or "oribus.cli" not in _cmdline(pid):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def up(
    log_dir: Path,
    data_dir: Path,
    *,
    processes: bool,
    port: int | None = None,
    shards: int = 2,
    name: str = "up",
    admin: bool = False,
) -> ServerProcess:
    """``oribus up`` on a free port (not yet started)."""
    address = f"127.0.0.1:{port or free_port()}"
    http = f"127.0.0.1:{free_port()}"
    args = ["up", "--data-dir", str(data_dir), "--listen", address, "--shards", str(shards), "--http", http]
    if processes:
        args.append("--processes")
    if admin:
        args.append("--admin")
    server = ServerProcess(name, args, log_dir, address)
    server.http_address = http
    return server


def shard(
    log_dir: Path, shard_id: int, data_dir: Path, port: int | None = None, verbose: bool = False,
    stream: bool = True, extra: tuple[str, ...] = (),
) -> ServerProcess:
    """``oribus shard`` on fixed addresses (gRPC, and the stream listener unless ``stream`` is
    False), so that it can be restarted at the same ones; ``extra``: more of its flags."""
    address = f"127.0.0.1:{port or free_port()}"
    stream_address = f"127.0.0.1:{free_port()}" if stream else None
    args = ["shard", "--id", str(shard_id), "--data-dir", str(data_dir), "--listen", address,
            "--stream-listen", stream_address or "off", *extra]
    server = ServerProcess(f"shard-{shard_id}", ["-v", *args] if verbose else args, log_dir, address)
    server.stream_address = stream_address
    return server


def bus(
    log_dir: Path, shard_addresses: list[str], port: int | None = None, verbose: bool = False
) -> ServerProcess:
    """``oribus bus`` over shard servers (shard 0 first; each ``ServerProcess.shard_address``)."""
    address = f"127.0.0.1:{port or free_port()}"
    http = f"127.0.0.1:{free_port()}"
    args = ["bus", "--listen", address, "--shards", ",".join(shard_addresses),
            "--data-dir", str(Path(log_dir) / "bus-data"), "--http", http]
    server = ServerProcess("bus", ["-v", *args] if verbose else args, log_dir, address)
    server.http_address = http
    return server


def two_shards_and_a_bus(cluster: Cluster, log_dir: Path, shard1_failpoints: str = ""
                         ) -> tuple[ServerProcess, ServerProcess, ServerProcess]:
    """Shard servers 0 and 1 (shard 1 with ``ORIBUS_FAILPOINTS`` armed, if given) and a bus
    over them, started and serving: (shard 0, shard 1, bus)."""
    s0 = cluster.add(shard(log_dir, 0, Path(log_dir) / "shard-0")).start()
    s1 = cluster.add(shard(log_dir, 1, Path(log_dir) / "shard-1"))
    if shard1_failpoints:
        s1.env = {"ORIBUS_FAILPOINTS": shard1_failpoints}
    s1.start()
    for s in (s0, s1):
        s.wait_serving()
    b = cluster.add(bus(log_dir, [s0.shard_address, s1.shard_address])).start()
    b.wait_serving()
    return s0, s1, b


def cluster_shard(log_dir: Path, etcd_url: str, shard_id: int, *, port: int | None = None,
                  lease_ttl: int = 2, claim_wait: float | None = None, name: str | None = None,
                  data_dir: Path | None = None) -> ServerProcess:
    """``oribus shard --etcd`` (cluster mode) on a fixed address, restartable there."""
    address = f"127.0.0.1:{port or free_port()}"
    args = ["shard", "--id", str(shard_id), "--data-dir", str(data_dir or Path(log_dir) / f"shard-{shard_id}"),
            "--listen", address, "--etcd", etcd_url, "--lease-ttl", str(lease_ttl)]
    if claim_wait is not None:
        args += ["--claim-wait", str(claim_wait)]
    return ServerProcess(name or f"shard-{shard_id}", args, log_dir, address)


def cluster_bus(log_dir: Path, etcd_url: str, *, port: int | None = None, lease_ttl: int = 2,
                name: str = "bus", http: bool = True) -> ServerProcess:
    """``oribus bus --etcd`` (cluster mode) on a fixed address, restartable there."""
    address = f"127.0.0.1:{port or free_port()}"
    args = ["bus", "--etcd", etcd_url, "--listen", address, "--data-dir", str(Path(log_dir) / f"{name}-data"),
            "--lease-ttl", str(lease_ttl)]
    server = ServerProcess(name, args, log_dir, address)
    if http:
        server.http_address = f"127.0.0.1:{free_port()}"
        args += ["--http", server.http_address]
    else:
        args.append("--no-http")
    return server


class Cluster:
    """Servers started together and stopped together (in reverse order)."""

    def __init__(self) -> None:
        self.servers: list[ServerProcess] = []

    def add(self, server: ServerProcess) -> ServerProcess:
        self.servers.append(server)
        return server

    def stop(self) -> None:
        errors = []
        for server in reversed(self.servers):
            try:
                server.stop()
            except Exception as e:  # stop the others anyway
                errors.append(e)
        if errors:
            raise errors[0]

    def logs(self) -> str:
        return "\n".join(f"==== {s.name} ====\n{s.log_tail()}" for s in self.servers)
