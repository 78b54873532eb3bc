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


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"
