"""A real etcd for tests: the Debian ``etcd-server`` binary on free ports in a temporary directory."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from processes import free_port

from oribus.hosts.up_groups import single_node_etcd


class EtcdServer:
    """``EtcdServer(dir).start()``; ``.url``; ``.stop()`` (by pid). Restartable on the same ports."""

    def __init__(self, data_dir: Path) -> None:
        binary = shutil.which("etcd")
        if binary is None:
            raise AssertionError("etcd is not installed: `make test` installs it (apt-get install etcd-server)")
        self.binary = binary
        self.data_dir = Path(data_dir)
        self.client_port = free_port()
        self.peer_port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    def start(self, timeout: float = 20.0) -> EtcdServer:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.data_dir / "etcd.log", "a")  # noqa: SIM115 - handed to the child
        peer = f"http://127.0.0.1:{self.peer_port}"
        self.proc = subprocess.Popen(
            single_node_etcd(self.binary, "test", self.data_dir / "data", self.url, peer),
            stdout=log, stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"etcd exited with {self.proc.returncode}: see {self.data_dir / 'etcd.log'}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.client_port)) == 0:
                    return self
            time.sleep(0.05)
        raise AssertionError(f"etcd did not listen within {timeout}s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
