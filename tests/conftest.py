import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))

# Tests that start real processes, sweep crash points, run the deterministic simulation or the
# engine-against-model state machine take seconds to minutes each: `make test` runs them,
# `make test-fast` (-m 'not slow') does not.
SLOW_PATHS = ("crash", "e2e", "deploy", "consistency/test_simulation.py", "consistency/test_engine_vs_model.py")


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        path = Path(item.path).resolve()
        if any(path.is_relative_to(TESTS / tier) for tier in SLOW_PATHS):
            item.add_marker(pytest.mark.slow)


# Lines a tier wants in the run's terminal summary (the crash sweep's counts): attached to a
# test report as user_properties ("summary:SECTION", line), so they reach this process from
# pytest-xdist workers too, and printed at the end of the run.
_SUMMARY = "summary:"
_summaries: dict[str, list[str]] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    for name, value in report.user_properties:
        if isinstance(name, str) and name.startswith(_SUMMARY):
            _summaries.setdefault(name[len(_SUMMARY):], []).append(str(value))


def pytest_terminal_summary(terminalreporter) -> None:  # noqa: ANN001 - pytest's reporter
    for section, lines in _summaries.items():
        terminalreporter.section(section)
        for line in lines:
            terminalreporter.write_line(line)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"
