"""``make system-deps``, ``spec`` and ``bench-deps`` install missing Debian packages without
their recommended packages and say so in one line; apt's output appears only on failure.

They run against a fake ``apt-get`` (first on PATH, and nothing else the targets look
for), which records its arguments and prints as much as a real install does.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MAKE = shutil.which("make")

FAKE_APT = """#!/bin/sh
echo "$@" >> {calls}
for i in $(seq 1 380); do echo "Selecting previously unselected package libfoo$i."; done
exit {code}
"""

pytestmark = pytest.mark.skipif(MAKE is None, reason="make is not installed")


def run_make(tmp_path: Path, target: str, apt_exit: int = 0) -> tuple[subprocess.CompletedProcess, list[str]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "apt-calls"
    fake = bin_dir / "apt-get"
    fake.write_text(FAKE_APT.format(calls=calls, code=apt_exit))
    fake.chmod(0o755)
    for tool in ("mktemp", "cat", "rm", "seq"):  # what the recipe and the fake use; no etcd, spin...
        (bin_dir / tool).symlink_to(shutil.which(tool))
    r = subprocess.run([MAKE, "-s", "-C", str(REPO), target], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PATH": str(bin_dir)})
    return r, calls.read_text().splitlines() if calls.exists() else []


def test_system_deps_installs_without_recommends_in_one_line(tmp_path):
    r, calls = run_make(tmp_path, "system-deps")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.splitlines() == [
        "installing etcd-server spin chromium chromium-driver ...",
        "installed: etcd-server spin chromium chromium-driver",
    ]
    assert r.stderr == ""
    install = [c for c in calls if "install" in c.split()]
    assert len(install) == 1 and "--no-install-recommends" in install[0].split(), calls


def test_bench_deps_installs_without_recommends_in_one_line(tmp_path):
    r, calls = run_make(tmp_path, "bench-deps")
    assert r.returncode == 0, r.stdout + r.stderr
    assert len(r.stdout.splitlines()) == 2 and r.stdout.splitlines()[-1].startswith("installed: redis-server")
    assert any("--no-install-recommends" in c.split() for c in calls), calls


def test_a_failed_install_shows_apt_output_and_fails(tmp_path):
    r, _ = run_make(tmp_path, "system-deps", apt_exit=100)
    assert r.returncode != 0
    assert "Selecting previously unselected package libfoo380." in r.stdout
    assert "apt-get install etcd-server spin chromium chromium-driver failed" in r.stdout
