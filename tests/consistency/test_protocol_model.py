"""The protocol models (specs/model/) under the SPIN model checker: the commit protocol's and
the replica group's (``replication.pml``, its variants ``broken_repl_*.pml``).

``specs/model/check.py`` searches ``oribus.pml`` exhaustively (its assertions, then each
``ltl`` property) in each of its configurations — the default one and ``ro_2pc`` (a
two-phase commit with a read-only participant) — and each ``broken_*.pml`` variant for a
counterexample in the configurations its ``configs:`` line names. This test runs it once
and holds it to both halves: the correct model verifies with no error over a non-empty
state space in every configuration, and every broken variant is caught — by the model's
assertions and by the ltl property its ``expect:`` line names — with a trail to show for
it, in ``ro_2pc`` through the two-phase commit's read lease. A checker that stopped finding
the bugs would be as wrong as a model with an error.

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
CONFIGS = ("default", "ro_2pc")


def _configs(variant: str) -> list[str]:
    m = re.search(r"configs:\s*(\w+(?:[ \t]+\w+)*)", (MODEL_DIR / variant).read_text())
    return m.group(1).split() if m else ["default"]


CASES = [(variant, config) for variant in BROKEN for config in _configs(variant)]
# the lease bugs, which the two-phase commit with a read-only participant must show too
LEASE_BUGS = ("broken_early_release.pml", "broken_no_deadline.pml", "broken_no_restart_grace.pml")

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
        [sys.executable, str(CHECK), "--json"], capture_output=True, text=True, timeout=900
    )
    assert proc.returncode in (0, 1), f"check.py failed to run:\n{proc.stdout}\n{proc.stderr}"
    return proc.returncode, json.loads(proc.stdout)


def _runs(results: dict, model: str, config: str) -> list[dict]:
    return [r for r in results["runs"] if r["model"] == model and r["config"] == config]


def test_there_is_something_to_check() -> None:
    assert LTL, "oribus.pml defines no ltl property"
    assert len(BROKEN) >= 3, BROKEN
    for variant in LEASE_BUGS:
        assert (variant, "ro_2pc") in CASES, f"{variant} is not searched in ro_2pc"


@pytest.mark.parametrize("config", CONFIGS)
def test_correct_model_verifies_exhaustively(checked: tuple[int, dict], config: str) -> None:
    _, results = checked
    runs = _runs(results, "oribus.pml", config)
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


REPLICATION_LTL = re.findall(r"^\s*ltl\s+(\w+)\s*\{", (MODEL_DIR / "replication.pml").read_text(), re.M)


def test_replication_model_verifies_exhaustively(checked: tuple[int, dict]) -> None:
    """One replica group (specs/replication.md): no acknowledged record lost, reads current."""
    _, results = checked
    runs = _runs(results, "replication.pml", "default")
    assert REPLICATION_LTL, "replication.pml defines no ltl property"
    assert sorted((r["check"], r["prop"] or "") for r in runs) == sorted(
        [("assertions", "")] + [("ltl", name) for name in REPLICATION_LTL]
    )
    for r in runs:
        assert r["errors"] == 0 and r["complete"] and r["states"] > 0 and r["ok"], r
    assert len({r["states"] for r in runs}) == 1
    assert {v for v, _ in CASES if v.startswith("broken_repl_")} >= {
        "broken_repl_ack_before_majority.pml", "broken_repl_elect_any.pml", "broken_repl_no_fence.pml",
        "broken_repl_learner_votes.pml", "broken_repl_no_term_start.pml", "broken_repl_no_lease.pml",
        "broken_repl_status_before_majority.pml"}


@pytest.mark.parametrize(("variant", "config"), CASES)
def test_broken_variant_has_a_counterexample(checked: tuple[int, dict], variant: str,
                                             config: str) -> None:
    _, results = checked
    runs = _runs(results, variant, config)
    assert {r["check"] for r in runs} == {"assertions", "ltl"}, runs
    for r in runs:
        what = f"{variant} in {config} ({r['prop'] or r['check']})"
        assert r["errors"] >= 1, f"{what}: no counterexample: the checks no longer catch this bug"
        assert r["trail"], f"{what}: pan reported an error but wrote no trail"
        assert r["events"], f"{what}: the trail replays no protocol event"
        assert r["ok"], r["problem"]
        if config == "ro_2pc" and variant in LEASE_BUGS:
            # through the new shape: A's lease on its read-only participant S2, granted in
            # A's phase one, and A's commit point at its primary on the stale read of K3
            events = r["events"]
            granted = "A: validate on S2 (read-only): YES"
            assert granted in events, f"{what}: A holds no lease on S2:\n" + "\n".join(events)
            lease = events.index(granted)
            stale = max(i for i, e in enumerate(events) if e.startswith("A: commit point"))
            assert lease < stale, f"{what}: the commit point precedes the lease:\n" + "\n".join(events)
            assert any(e.startswith("B: one-phase commit on S2: COMMITTED") for e in events[lease:stale]), (
                f"{what}: K3 is not written between A's lease and A's commit point:\n" + "\n".join(events)
            )


def test_checker_exit_status(checked: tuple[int, dict]) -> None:
    returncode, results = checked
    assert results["ok"] and returncode == 0, [r["problem"] for r in results["runs"] if not r["ok"]]
