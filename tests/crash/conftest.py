"""Crash tests: progress lines while the sweep runs, and its summary at the end of the run.

The suite may run on several pytest-xdist workers, where a fixture's output never reaches the
terminal: summary lines therefore travel in the next test report's ``user_properties`` (sent
from worker to controller), and tests/conftest.py prints them from the reports, which works
with and without workers. Progress lines are shown only without workers (a worker has no
terminal).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import pytest

_PENDING = pytest.StashKey[list[str]]()  # lines not yet attached to a report
_PROPERTY = "summary:crash tests"  # read by tests/conftest.py


@pytest.fixture(scope="session")
def crash_report(request: pytest.FixtureRequest) -> list[str]:
    """Lines appended here are printed in pytest's terminal summary (even with -q)."""
    return request.config.stash.setdefault(_PENDING, [])


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # noqa: ANN201
    outcome = yield
    pending = item.config.stash.get(_PENDING, [])
    if pending:
        outcome.get_result().user_properties.extend((_PROPERTY, line) for line in pending)
        pending.clear()


@pytest.fixture(scope="session")
def crash_progress(request: pytest.FixtureRequest) -> Callable[[str], None]:
    """Writes a line to the terminal at once, even while pytest captures output: the sweep
    runs for minutes inside one fixture, which would otherwise be silent."""
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")

    def say(line: str) -> None:
        if reporter is None:
            return
        with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
            reporter.write_line(line)

    return say
