"""Crash tests: progress lines while the sweep runs, and its summary at the end of the run."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import pytest

_REPORT = pytest.StashKey[list[str]]()


@pytest.fixture(scope="session")
def crash_report(request: pytest.FixtureRequest) -> list[str]:
    """Lines appended here are printed in pytest's terminal summary (even with -q)."""
    return request.config.stash.setdefault(_REPORT, [])


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


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    lines = config.stash.get(_REPORT, [])
    if lines:
        terminalreporter.section("crash tests")
        for line in lines:
            terminalreporter.write_line(line)
