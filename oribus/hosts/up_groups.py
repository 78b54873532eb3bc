"""``oribus up --processes --replicas R``: replica groups on one machine, supervised.

What ``UpHost`` (``oribus.hosts.up``) uses when ``replicas`` > 1:

``PrivateEtcd``
    Without ``--etcd``, a private etcd from the ``etcd`` binary, on free ports, its data in
    ``DATA/etcd/`` (so a restart of ``up`` finds the cluster's terms again). It is told to
    die with this process (``PR_SET_PDEATHSIG``) and is stopped by pid on a clean stop. No
    ``etcd`` installed: ``InvalidRequest`` saying so, before anything starts.

``GroupSupervisor``
    ``N × R`` member processes (``oribus shard --id i --member r``), each in
    ``DATA/groups/shard-NNNN/member-r/`` and on a Unix socket for its stream listener, all
    dying with this process (``oribus.lifeline``). It watches them the way a StatefulSet
    does: a member process that exits is started again under the same member id — on an
    empty directory if its data is gone, where it rejoins as a learner and catches up
    (``specs/replication.md`` §7). Which member is primary is etcd's business; ``describe``
    says who is where.

Layout: ``DATA/groups/layout.json`` = ``{"format": 1, "shards": N, "replicas": R}``; a data
directory of another shape (or one holding an unreplicated ``layout.json``) is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from oribus.errors import InvalidRequest, Unavailable
from oribus.hosts.lifecycle import free_port
from oribus.lifeline import PR_SET_PDEATHSIG

log = logging.getLogger("oribus.cluster")

GROUPS_DIR = "groups"
ETCD_DIR = "etcd"
ETCD_START_SECONDS = 20.0  # a private etcd has this long to answer
RESTART_DELAY = 0.5  # seconds between a member's exit and its restart (a crash loop stays slow)


def _die_with_parent() -> None:  # in the child, before exec
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def single_node_etcd(binary: str, name: str, data_dir: Path, client_url: str, peer_url: str) -> list[str]:
    """The command line of a one-member etcd cluster serving ``client_url``."""
    return [binary, "--name", name, "--data-dir", str(data_dir),
            "--listen-client-urls", client_url, "--advertise-client-urls", client_url,
            "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
            "--initial-cluster", f"{name}={peer_url}", "--initial-cluster-state", "new",
            "--log-level", "warn"]


class PrivateEtcd:
    """A single-node etcd for this machine's groups: ``await start()``, ``url``, ``stop()``."""

    def __init__(self, data_dir: Path) -> None:
        binary = shutil.which("etcd")
        if binary is None:
            raise InvalidRequest("replica groups need etcd: give --etcd URL, or install the etcd binary "
                                 "(Debian/Ubuntu: apt-get install etcd-server; or https://etcd.io) so that "
                                 "`oribus up` can start a private one")
        self.binary = binary
        self.data_dir = Path(data_dir)
        self.client_port = 0
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    async def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.client_port, peer_port = free_port(), free_port()
        peer = f"http://127.0.0.1:{peer_port}"
        with open(self.data_dir / "etcd.log", "a") as out:
            self.proc = subprocess.Popen(
                single_node_etcd(self.binary, "oribus-up", self.data_dir / "data", self.url, peer),
                stdout=out, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)  # noqa: PLW1509
        deadline = time.monotonic() + ETCD_START_SECONDS
        while True:
            if self.proc.poll() is not None:
                raise Unavailable(f"the private etcd exited with code {self.proc.returncode}: see "
                                  f"{self.data_dir / 'etcd.log'}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.client_port)) == 0:
                    return
            if time.monotonic() > deadline:
                raise Unavailable(f"the private etcd did not answer within {ETCD_START_SECONDS:g}s")
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.get_running_loop().run_in_executor(None, proc.wait, 10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def check_groups_layout(data_dir: Path, shards: int, replicas: int) -> None:
    """Create ``DATA/groups/layout.json``, or check that it says ``shards`` × ``replicas``."""
    if (Path(data_dir) / "layout.json").exists():
        raise InvalidRequest(f"{data_dir} holds the data of unreplicated shards; replica groups need a data "
                             "directory of their own")
    path = Path(data_dir) / GROUPS_DIR / "layout.json"
    want = {"format": 1, "shards": shards, "replicas": replicas}
    if path.exists():
        have = json.loads(path.read_text())
        if (have.get("shards"), have.get("replicas")) != (shards, replicas):
            raise InvalidRequest(f"{data_dir} holds {have.get('shards')} shards of {have.get('replicas')} "
                                 f"replicas; it cannot be opened with {shards} of {replicas}")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(want))
    os.replace(tmp, path)


def stored_groups(data_dir: Path) -> tuple[int, int] | None:
    """(shards, replicas) a data directory's groups were created with (None: none yet)."""
    path = Path(data_dir) / GROUPS_DIR / "layout.json"
    if not path.exists():
        return None
    have = json.loads(path.read_text())
    return int(have["shards"]), int(have["replicas"])


class GroupSupervisor:
    """Starts every member process and starts again each one that exits (module docstring)."""

    def __init__(self, data_dir: Path, shards: int, replicas: int,
                 command: Callable[[int, int, Path], list[str]], pass_fds: tuple[int, ...] = ()) -> None:
        self.data_dir = Path(data_dir)
        self.shards = shards
        self.replicas = replicas
        self.command = command  # (shard, member, member dir) -> argv
        self.pass_fds = pass_fds
        self.procs: dict[tuple[int, int], subprocess.Popen] = {}
        self.restarts: dict[tuple[int, int], int] = {}
        self._stopping = False

    def member_dir(self, shard: int, member: int) -> Path:
        return self.data_dir / GROUPS_DIR / f"shard-{shard:04d}" / f"member-{member}"

    def spawn(self, shard: int, member: int) -> subprocess.Popen:
        directory = self.member_dir(shard, member)
        directory.mkdir(parents=True, exist_ok=True)  # gone: an empty one (the member rejoins as a learner)
        with open(directory.parent / f"member-{member}.log", "a") as out:
            proc = subprocess.Popen(self.command(shard, member, directory), stdout=out, stderr=subprocess.STDOUT,
                                    pass_fds=self.pass_fds)
        self.procs[(shard, member)] = proc
        return proc

    def start_all(self) -> None:
        for shard in range(self.shards):
            for member in range(self.replicas):
                self.spawn(shard, member)

    async def supervise(self, poll: float = 0.2) -> None:
        """Restart every member process that exits, until cancelled."""
        while not self._stopping:
            await asyncio.sleep(poll)
            for (shard, member), proc in list(self.procs.items()):
                if proc.poll() is None or self._stopping:
                    continue
                lost = not self.member_dir(shard, member).exists()
                log.warning("shard %d member %d (pid %d) exited with code %s; starting it again%s", shard, member,
                            proc.pid, proc.returncode, " on an empty directory (its data is gone)" if lost else "")
                self.restarts[(shard, member)] = self.restarts.get((shard, member), 0) + 1
                await asyncio.sleep(RESTART_DELAY)
                if not self._stopping:
                    self.spawn(shard, member)

    async def stop(self, grace: float) -> None:
        """SIGTERM to every member (a primary resigns), then wait; kill what outlives ``grace``."""
        self._stopping = True
        procs = list(self.procs.values())
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                await asyncio.get_running_loop().run_in_executor(None, proc.wait, grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def describe(self) -> dict:
        """Where every member is: for the banner and ``--json``."""
        return {str(shard): [{"member": member, "pid": self.procs[(shard, member)].pid,
                              "data_dir": str(self.member_dir(shard, member)),
                              "restarts": self.restarts.get((shard, member), 0)}
                             for member in range(self.replicas)]
                for shard in range(self.shards)}


async def wait_for_voters(not_voters: Callable[[], Awaitable[list[str]]], timeout: float,
                          poll: float = 0.1) -> list[str]:
    """Until ``not_voters()`` (the members that are not voters yet, named) is empty, at most
    ``timeout`` seconds; returns what it last said (empty: every member is a voter).

    A member that opens after its group's first term began finds the term register moved and
    its directory empty: it starts as a learner and catches up (``specs/replication.md`` §7).
    Until it is a voter, its group holds only a bare majority of complete copies, and losing
    one more member would leave it without a primary. ``oribus up`` waits for this before it
    says it is serving."""
    deadline = time.monotonic() + timeout
    while True:
        missing = await not_voters()
        if not missing or time.monotonic() >= deadline:
            return missing
        await asyncio.sleep(poll)


def python_command() -> list[str]:
    return [sys.executable, "-m", "oribus.cli"]
