"""The interface every benchmarked backend implements, and what they share.

A backend is one row of the comparison: a server (or the embedded engine)
that the harness starts itself, on loopback, in a directory of its own::

    backend = RedisWatch(fsync="always")
    await backend.start(work_dir)          # server on free ports, durable config
    await backend.reset()                  # empty state for the next run
    await backend.populate(keys, value_size)
    client = await backend.client()        # one per concurrent worker
    outcome = await client.step(["k1", "k2", "k3"], ["k1"], session=7)
    counters = await backend.read_counters(keys)   # the backend's own state, for the audit
    await client.close(); await backend.stop()

**The step** (what the workloads are made of): read ``read_keys``, then for
every key in ``write_keys`` (a subset of ``read_keys``) write its counter
plus one, keeping its padding; commit only if none of the keys read changed
since it was read, with the backend's own optimistic mechanism. The step
returns an ``Outcome``: committed or refused (a conflict), the counter seen
for every key read, the counters written, and when the commit was sent (the
audit needs it). Anything else (a lost connection, a timeout) is raised:
its outcome is unknown and the harness accounts for it as such.

**Values** are a counter and ``value_size`` bytes of padding. The counter of
a key is the number of commits that wrote it: that is what makes lost
updates and accepted stale commits visible to the audit (harness/audit.py).

**Sessions**: ``session`` is the index of the agent taking the step. oribus
keeps a delivery log per session on the server; the peers keep nothing
between steps (their optimistic checks live inside one transaction), so for
them a session is only a name and ``touch`` does nothing.

Each backend says in ``describe()`` how it is configured, with the
durability settings read back from the running server, not assumed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from agent_step_network import free_port  # noqa: F401 - the peers take it from here


@dataclass(slots=True)
class Outcome:
    """What one attempt of a step did."""

    committed: bool  # False: refused by the backend's check (nothing written)
    seen: dict[str, int]  # counter read per key
    written: dict[str, int]  # counter written per key (empty when refused)
    sent: float  # time.perf_counter() just before the commit was sent


class BackendUnavailable(RuntimeError):
    """The backend cannot run here (binary missing and not installable, not root, ...)."""


class Client(ABC):
    """One concurrent worker's connection to a backend."""

    @abstractmethod
    async def step(self, read_keys: Sequence[str], write_keys: Sequence[str], session: int) -> Outcome:
        """Read ``read_keys``; write each of ``write_keys`` as its counter + 1; commit if unchanged."""

    @abstractmethod
    async def read(self, keys: Sequence[str], session: int) -> dict[str, int]:
        """A read-only step: the counters of ``keys``, read together (no commit)."""

    async def touch(self, session: int, key: str) -> None:  # noqa: B027 - optional hook
        """Make ``session`` live on the server (oribus: a delivery); nothing for the peers."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release the connection."""


class Backend(ABC):
    """One row of the comparison. ``start`` once, then ``reset``/``populate`` per run."""

    name: str = ""  # the row's label, e.g. "redis-always"
    durable: bool = True  # False only for a row that says so (e.g. Redis appendfsync everysec)
    peer: bool = True  # False for the oribus rows (ratios are oribus / peer)

    @abstractmethod
    async def start(self, work: Path) -> None:
        """Start the server in ``work`` (a fresh directory) on free loopback ports."""

    @abstractmethod
    async def stop(self) -> None:
        """Stop the server (idempotent)."""

    @abstractmethod
    async def reset(self) -> None:
        """Remove every key: the next run starts from an empty store."""

    @abstractmethod
    async def populate(self, keys: Sequence[str], value_size: int) -> None:
        """Write every key with counter 0 and ``value_size`` bytes of padding."""

    @abstractmethod
    async def client(self) -> Client:
        """A new client (one per concurrent worker)."""

    @abstractmethod
    async def read_counters(self, keys: Sequence[str]) -> list[int | None]:
        """The counter of every key as the backend holds it now (None: key missing)."""

    def server_sessions(self) -> set[int]:
        """Session ids of the backend's server processes (each started in a session of its
        own), for their CPU time; empty when the backend runs in the harness's process."""
        server = getattr(self, "server", None)
        proc = getattr(server, "proc", None)
        return {proc.pid} if proc is not None and proc.poll() is None else set()

    @abstractmethod
    async def describe(self) -> dict:
        """Version, how it was started and the durability settings read back from it."""


# ---- value codec (the peers store bytes; oribus stores a dict) ------------------------------


def encode_value(counter: int, pad: bytes) -> bytes:
    """``b"<counter>:<padding>"``."""
    return b"%d:%s" % (counter, pad)


def decode_value(raw: bytes) -> tuple[int, bytes]:
    counter, _, pad = raw.partition(b":")
    return int(counter), pad


def padding(value_size: int) -> bytes:
    return b"x" * value_size


# ---- processes and ports ---------------------------------------------------------------------


def require_binary(name: str, package: str, install: bool) -> str:
    """The path of ``name``; installs Debian ``package`` first when missing and ``install``."""
    path = shutil.which(name)
    if path is None and install and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", package]):
            subprocess.run(cmd, env=env, check=False, stdout=subprocess.DEVNULL)
        path = shutil.which(name)
    if path is None:
        raise BackendUnavailable(f"{name} not found: install the Debian package {package}")
    return path


def version_of(cmd: list[str]) -> str:
    """First line of ``cmd``'s output (e.g. ``redis-server --version``)."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unknown ({e})"
    return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr) else "unknown"


class ServerProcess:
    """A server started by the harness: its own process group, log file, stopped by pid."""

    def __init__(self, name: str, log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self, cmd: list[str], *, user: str | None = None, cwd: Path | None = None) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        try:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=cwd,
                                         start_new_session=True, user=user)
        finally:
            log.close()

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    async def wait_port(self, port: int, timeout: float = 60.0) -> None:
        """Until something accepts on 127.0.0.1:``port``; raises with the log tail if the process dies."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.running():
                code = self.proc.returncode if self.proc else None
                raise BackendUnavailable(f"{self.name} exited with {code}:\n{self.log_tail()}")
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
                return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise BackendUnavailable(f"{self.name} did not listen on {port} in {timeout:g}s:\n"
                                         f"{self.log_tail()}")
            await asyncio.sleep(0.05)

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        """Signal the process, wait, SIGKILL its group after ``timeout``."""
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(sig)
        loop = asyncio.get_running_loop()
        try:
            code = await loop.run_in_executor(None, proc.wait, timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            code = await loop.run_in_executor(None, proc.wait)
        return code

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""
