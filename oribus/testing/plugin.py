"""The pytest plugin ``pip install oribus`` registers (entry point ``pytest11``: ``oribus``).

Fixtures:

- ``oribus_bus``: an ``oribus.AsyncSession`` on an embedded engine in a temporary
  directory (``bus.session(agent=...)`` for more agents), closed after the test.
  ``@pytest.mark.oribus_bus(shards=2, ...)`` passes options to ``oribus.open_local``.
- ``oribus_server``: a real ``oribus up`` process on free loopback ports in a
  temporary directory (``.address``, ``.http_url``, ``.pid``), stopped by pid after
  the test. ``@pytest.mark.oribus_server("--processes", ...)`` adds options.
- ``oribus_history``: records every read and commit the test's agents make through
  the SDK (any session opened during the test: ``oribus.open_local``,
  ``oribus.connect``, ``oribus.Client``, ``bus.session``) and, at teardown, checks the
  history (``oribus.checker``); an anomaly fails the test with its class and a minimal
  example. With ``oribus_bus`` or ``oribus_server`` it also reads the final state.

The async fixture ``oribus_bus`` needs pytest-asyncio (``pip install 'oribus[testing]'``,
which also brings Hypothesis for ``oribus.testing.machine``); without it the plugin
still loads and the fixture says what is missing. Nothing of oribus is imported until a
fixture is used, so the plugin costs other test suites nothing.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from oribus.client.session import AsyncSession
    from oribus.testing.recording import Recording
    from oribus.testing.server import UpServer

try:
    import pytest_asyncio
except ImportError:  # the oribus_bus fixture says so when used
    HAVE_PYTEST_ASYNCIO = False
else:
    HAVE_PYTEST_ASYNCIO = True


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "oribus_bus(**options): options of oribus.open_local for oribus_bus")
    config.addinivalue_line("markers", "oribus_server(*args): more command-line options of oribus up")


def _history_of(request: pytest.FixtureRequest) -> Recording | None:
    """The test's recording, set up first (so torn down last) when the test asks for one."""
    if "oribus_history" not in request.fixturenames:
        return None
    recording: Recording = request.getfixturevalue("oribus_history")
    return recording


@pytest.fixture
def oribus_history() -> Iterator[Recording]:
    """Records the test's SDK operations; fails the test if the history has an anomaly."""
    from oribus.testing.recording import Recording

    recording = Recording()
    with recording.capturing():
        yield recording
    report = recording.check()
    if not report.ok:
        pytest.fail(recording.failure(report), pytrace=False)


async def _open_bus(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[AsyncSession]:
    import oribus

    recording = _history_of(request)
    marker = request.node.get_closest_marker("oribus_bus")
    options: dict[str, Any] = dict(marker.kwargs) if marker else {}
    options.setdefault("agent", "test")
    bus = await oribus.open_local(tmp_path / "oribus-bus", **options)
    try:
        yield bus
        if recording is not None:
            await recording.capture_final(bus._bus)
    finally:
        await bus.close()


if HAVE_PYTEST_ASYNCIO:
    @pytest_asyncio.fixture
    async def oribus_bus(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[AsyncSession]:
        """An ``oribus.AsyncSession`` on an embedded engine in a temporary directory."""
        async for bus in _open_bus(request, tmp_path):
            yield bus
else:
    @pytest.fixture
    def oribus_bus() -> None:
        """An ``oribus.AsyncSession`` on an embedded engine (needs pytest-asyncio)."""
        pytest.fail("the oribus_bus fixture needs pytest-asyncio: pip install 'oribus[testing]'", pytrace=False)


@pytest.fixture
def oribus_server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[UpServer]:
    """A real ``oribus up`` on free ports in a temporary directory, stopped by pid after."""
    import asyncio

    from oribus.testing.server import UpServer

    recording = _history_of(request)
    marker = request.node.get_closest_marker("oribus_server")
    server = UpServer(tmp_path / "oribus-server", [str(a) for a in marker.args] if marker else []).start()
    try:
        yield server
        if recording is not None:
            asyncio.run(_capture_remote(recording, server.address))
    finally:
        server.stop()


async def _capture_remote(recording: Recording, address: str) -> None:
    from oribus.rpc.bus_client import RemoteBus

    remote = RemoteBus(address)
    try:
        await recording.capture_final(remote)
    finally:
        await remote.close()
