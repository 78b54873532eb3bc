"""``--start-local``: an ``oribus up --processes`` that verify starts, faults and stops itself.

It runs in a temporary directory on free loopback ports, with its output in
``up.log`` there. Because verify started it, the nemesis may kill -9 it and
start it again on the same ports and data (its shard processes die with it:
``oribus.lifeline``), which it cannot do for processes it was only given.

With ``replicas`` > 1 (``--replicas 3``) it is ``oribus up --processes --replicas R`` with a
short lease TTL (``GROUP_LEASE_TTL``, so that failovers take seconds): each shard a replica
group of member processes that ``oribus up`` restarts when they die, over the private etcd
it starts. The nemesis then hits the members, not ``oribus up`` (``GroupNemesis``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from oribus.hosts.lifecycle import free_port

GROUP_LEASE_TTL = 3  # seconds: the members' etcd lease, hence about how long a failover takes


class LocalDeployment:
    """``oribus up --processes`` on free ports in a temporary directory."""

    def __init__(self, shards: int = 2, replicas: int = 1, lease_ttl: int = GROUP_LEASE_TTL) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="oribus-verify-"))
        self.address = f"127.0.0.1:{free_port()}"
        self.http_address = f"127.0.0.1:{free_port()}"
        self.shards = shards
        self.replicas = replicas  # > 1: every shard a replica group of this many member processes
        self.lease_ttl = lease_ttl  # with replicas > 1
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def http_url(self) -> str:
        return f"http://{self.http_address}"

    def _spawn(self) -> None:
        groups = (["--replicas", str(self.replicas), "--lease-ttl", str(self.lease_ttl)]
                  if self.replicas > 1 else [])
        with open(self.dir / "up.log", "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "oribus.cli", "up", "--processes", "--shards", str(self.shards), *groups,
                 "--data-dir", str(self.dir / "data"), "--listen", self.address, "--http", self.http_address],
                stdout=log, stderr=subprocess.STDOUT)

    async def start(self, timeout: float = 60.0) -> int:
        """Start it (again) and wait until it serves; returns its pid. A restart right after a
        kill may find the old shard processes still holding their data: it tries again."""
        deadline = time.monotonic() + timeout
        while True:
            self._spawn()
            assert self.proc is not None
            if await self._serving(deadline):
                return self.proc.pid
            if self.proc.poll() is None or time.monotonic() > deadline:
                raise RuntimeError(f"oribus up did not start; see {self.dir / 'up.log'}")
            await asyncio.sleep(0.5)

    async def _serving(self, deadline: float) -> bool:
        import oribus
        from oribus.errors import OribusError

        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                return False
            try:
                async with oribus.connect(self.address, agent="verify-probe", timeout=2.0) as s:
                    await s.get("verify-probe")
                return True
            except OribusError:
                await asyncio.sleep(0.2)
        return False

    async def restart(self) -> int:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            await asyncio.to_thread(self.proc.wait)
        return await self.start()

    def remove(self) -> None:
        """Delete the temporary directory (data, the private etcd's included, and up.log)."""
        shutil.rmtree(self.dir, ignore_errors=True)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGCONT)  # a paused process cannot handle SIGTERM
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
