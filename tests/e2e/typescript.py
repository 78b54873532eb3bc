"""The TypeScript SDK (clients/typescript) for the end-to-end tests: node, its build, its agents.

``package()`` installs the package's locked dev dependencies when ``node_modules`` is
missing (``npm ci``), builds ``dist/`` once per test run, and gives the package's directory;
a test skips when node or npm is not installed.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "clients" / "typescript"


def oribus_bin() -> str:
    """The server the package's tests start: this interpreter's ``oribus``."""
    beside = Path(sys.executable).parent / "oribus"
    return str(beside) if beside.exists() else shutil.which("oribus") or "oribus"


def node_env() -> dict[str, str]:
    return {**os.environ, "ORIBUS_BIN": oribus_bin()}


def npm(*args: str, timeout: float = 600.0, cwd: Path = PACKAGE) -> subprocess.CompletedProcess:
    return subprocess.run(["npm", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=node_env())


@functools.cache
def _build() -> Path:
    if not (PACKAGE / "node_modules").is_dir():
        done = npm("ci", "--no-audit", "--no-fund")
        assert done.returncode == 0, f"npm ci failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    done = npm("run", "build")
    assert done.returncode == 0, f"npm run build failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return PACKAGE


def package() -> Path:
    """clients/typescript with dist/ built (skips the test when node or npm is missing)."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node and npm are not installed (the TypeScript SDK needs Node 20 or later)")
    return _build()
