"""`make test-fast` (-m 'not slow') leaves out every real-process, crash, deployment and
simulation test: tests/conftest.py marks them slow by where they live."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]
# tests/conftest.py by path: other tiers have a conftest module of their own on sys.path
_spec = importlib.util.spec_from_file_location("tests_conftest", TESTS / "conftest.py")
conftest = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(conftest)


class Item:
    """What the hook reads and writes of a collected test item."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.markers: list[str] = []

    def add_marker(self, marker: pytest.MarkDecorator) -> None:
        self.markers.append(marker.name)


def marked_slow(paths: list[Path]) -> dict[str, bool]:
    items = [Item(p) for p in paths]
    conftest.pytest_collection_modifyitems(None, items)
    return {str(i.path.relative_to(TESTS)): "slow" in i.markers for i in items}


def test_process_crash_deploy_and_simulation_tests_are_slow():
    slow = [*TESTS.glob("e2e/test_*.py"), *TESTS.glob("crash/test_*.py"), *TESTS.glob("deploy/test_*.py"),
            TESTS / "consistency/test_simulation.py", TESTS / "consistency/test_engine_vs_model.py"]
    assert len(slow) > 20
    assert all(marked_slow(slow).values()), [p for p, s in marked_slow(slow).items() if not s]


def test_unit_and_integration_tests_stay_fast():
    fast = [*TESTS.glob("unit/test_*.py"), *TESTS.glob("integration/test_*.py")]
    assert not any(marked_slow(fast).values())
