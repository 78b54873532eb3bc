"""The commit protocol model (specs/model/) under the SPIN model checker.

``specs/model/check.py`` searches ``oribus.pml`` exhaustively (its assertions, then each
``ltl`` property) and each ``broken_*.pml`` variant for a counterexample. This test runs
it once and holds it to both halves: the correct model verifies with no error over a
non-empty state space, and every broken variant is caught — by the model's assertions
and by the ltl property its ``expect:`` line names — with a trail to show for it. A
checker that stopped finding the bugs would be as wrong as a model with an error.

SPIN is a system package (``make system-deps`` installs it); without it this fails.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

MODEL_DIR = Path(__file__).resolve().parents[2] / "specs" / "model"
CHECK = MODEL_DIR / "check.py"
BROKEN = sorted(p.name for p in MODEL_DIR.glob("broken_*.pml"))
LTL = re.findall(r"^\s*ltl\s+(\w+)\s*\{", (MODEL_DIR / "oribus.pml").read_text(), re.M)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def checked() -> tuple[int, dict]:
    if shutil.which("spin") is None:
        pytest.fail(
            "the SPIN model checker is not installed: `make system-deps` "
            "(or `apt-get install spin`) installs it",
            pytrace=False,
        )
    proc = subprocess.run(
        [sys.executable, str(CHECK), "--json"], capture_output=True, text=True, timeout=240
    )
    assert proc.returncode in (0, 1), f"check.py failed to run:\n{proc.stdout}\n{proc.stderr}"
    return proc.returncode, json.loads(proc.stdout)


def _runs(results: dict, model: str) -> list[dict]:
    return [r for r in results["runs"] if r["model"] == model]


def test_there_is_something_to_check() -> None:
    assert LTL, "oribus.pml defines no ltl property"
    assert len(BROKEN) >= 3, BROKEN


def test_correct_model_verifies_exhaustively(checked: tuple[int, dict]) -> None:
    _, results = checked
    runs = _runs(results, "oribus.pml")
    assert sorted((r["check"], r["prop"] or "") for r in runs) == sorted(
        [("assertions", "")] + [("ltl", name) for name in LTL]
    )
    for r in runs:
        what = r["prop"] or r["check"]
        assert r["errors"] == 0, f"{what}: the model has an error:\n" + "\n".join(r["events"])
        assert r["complete"], f"{what}: the search was not exhaustive: {r['problem']}"
        assert r["states"] > 0, what
        assert r["ok"], r["problem"]
    # every property was checked over the same, whole state space
    assert len({r["states"] for r in runs}) == 1


@pytest.mark.parametrize("variant", BROKEN)
def test_broken_variant_has_a_counterexample(checked: tuple[int, dict], variant: str) -> None:
    _, results = checked
    runs = _runs(results, variant)
    assert {r["check"] for r in runs} == {"assertions", "ltl"}, runs
    for r in runs:
        what = f"{variant} ({r['prop'] or r['check']})"
        assert r["errors"] >= 1, f"{what}: no counterexample: the checks no longer catch this bug"
        assert r["trail"], f"{what}: pan reported an error but wrote no trail"
        assert r["events"], f"{what}: the trail replays no protocol event"
        assert r["ok"], r["problem"]


def test_checker_exit_status(checked: tuple[int, dict]) -> None:
    returncode, results = checked
    assert results["ok"] and returncode == 0, [r["problem"] for r in results["runs"] if not r["ok"]]
