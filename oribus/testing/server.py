"""``UpServer``: a real ``oribus up`` process on free loopback ports in a directory, stopped by pid.

Used by the ``oribus_server`` fixture. It waits until the bus answers a read; ``stop``
sends SIGTERM to its pid (SIGKILL if it has not exited after ``STOP_TIMEOUT``); the
shard processes of ``up --processes`` die with it (``oribus.lifeline``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from oribus.hosts.lifecycle import free_port

START_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0


class UpServer:
    """``oribus up`` on free ports in ``directory``: gRPC at ``address``, HTTP at ``http_url``.

    Example::

        server = UpServer(tmp_path, ["--admin"]).start()
        try:
            async with oribus.connect(server.address, agent="alice") as bus: ...
        finally:
            server.stop()
    """

    def __init__(self, directory: Path, args: Sequence[str] = ()) -> None:
        self.directory = Path(directory)
        self.data_dir = self.directory / "data"
        self.address = f"127.0.0.1:{free_port()}"
        self.http_address = f"127.0.0.1:{free_port()}"
        self.stream_address = f"127.0.0.1:{free_port()}"
        self.args = list(args)
        self.log = self.directory / "up.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def http_url(self) -> str:
        return f"http://{self.http_address}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def command(self) -> list[str]:
        return [sys.executable, "-m", "oribus.cli", "up", "--data-dir", str(self.data_dir),
                "--listen", self.address, "--http", self.http_address,
                "--stream-listen", self.stream_address, *self.args]

    def start(self) -> UpServer:
        """Start it and wait until it serves; raises RuntimeError (with its log) if it does not."""
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT)
        try:
            asyncio.run(self._wait_serving())
        except BaseException:
            self.stop()
            raise
        return self

    async def _wait_serving(self) -> None:
        import oribus

        deadline = time.monotonic() + START_TIMEOUT
        assert self.proc is not None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"oribus up exited with {self.proc.returncode}:\n{self.output()}")
            try:
                async with oribus.connect(self.address, agent="oribus-testing-probe", timeout=2.0) as bus:
                    await bus.stats()
                return
            except oribus.OribusError:
                await asyncio.sleep(0.1)
        raise RuntimeError(f"oribus up did not serve within {START_TIMEOUT:g}s:\n{self.output()}")

    def output(self) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_text(errors="replace")[-3000:]
        return ""

    def stop(self) -> int | None:
        """SIGTERM by pid, SIGKILL if it lingers; returns its exit code. Idempotent."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGCONT)  # a stopped process cannot handle SIGTERM
                os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode
