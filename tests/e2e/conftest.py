"""End-to-end tests: real ``oribus`` processes on free ports in temporary directories.

Module-scoped fixtures share one server per test module (tests use their own
key prefixes); tests that crash servers start their own. A failed test prints
the tail of every live server's log.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from etcd_server import EtcdServer  # noqa: E402
from processes import Cluster, ServerProcess, up  # noqa: E402

from oribus.meta.slots import StaticSlotMap  # noqa: E402

SHARDS = 2
SLOT_MAP = StaticSlotMap(SHARDS)  # what ``up`` and ``bus`` use for two shards

_live: list[Cluster] = []


def keys_on_shard(shard_id: int, prefix: str, n: int = 1) -> list[str]:
    """``n`` keys under ``prefix`` that the two-shard slot map puts on ``shard_id``."""
    out = []
    for i in itertools.count():
        k = f"{prefix}/{i}"
        if SLOT_MAP.shard_for(k) == shard_id:
            out.append(k)
            if len(out) == n:
                return out
    raise AssertionError("unreachable")


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdServer]:
    """A real etcd of the test's own, on free ports in its temporary directory."""
    server = EtcdServer(tmp_path / "etcd").start()
    yield server
    server.stop()


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    """Servers a test starts itself; all are stopped by pid when it ends."""
    c = Cluster()
    _live.append(c)
    try:
        yield c
    finally:
        _live.remove(c)
        c.stop()


def _serve(tmp_path_factory: pytest.TempPathFactory, processes: bool) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("up-processes" if processes else "up-embedded")
    c = Cluster()
    server = c.add(up(root, root / "data", processes=processes))
    _live.append(c)
    try:
        server.start().wait_serving()
        yield server
    finally:
        _live.remove(c)
        c.stop()


@pytest.fixture(scope="module")
def up_embedded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """``oribus up``: bus and two in-process shards in one process."""
    yield from _serve(tmp_path_factory, processes=False)


@pytest.fixture(scope="module")
def up_processes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """``oribus up --processes``: the bus process and two shard processes over gRPC."""
    yield from _serve(tmp_path_factory, processes=True)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    if report.when == "call" and report.failed and _live:
        report.sections.append(("oribus server logs", "\n".join(c.logs() for c in _live)))
    return report
