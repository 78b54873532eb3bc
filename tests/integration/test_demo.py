"""``oribus demo`` end to end: the checker finds no corruption with ORI and some without it."""

from __future__ import annotations

import oribus
from oribus.demo import Ledger, audit, demo


async def test_demo_shows_corruptions_only_without_validation(tmp_path, capsys):
    # Two hot projects, ten agents, a few ms between read and commit: without validation
    # hundreds of stale commits get through in a second, so "> 0" does not flake.
    report = await demo(tmp_path / "demo", shards=2, seconds=1.0, live=False)
    out = capsys.readouterr().out
    assert report.ori.audit.corruptions == [], out
    assert report.ori.audit.checked == report.ori.tally.commits > 0
    assert report.ori.tally.conflicts > 0  # validation did have something to refuse
    assert len(report.unsafe.audit.corruptions) > 0, out
    assert report.unsafe.tally.conflicts == 0  # nothing is refused for a stale read
    assert report.problems == [] and report.exit_code == 0, out
    assert "pre-restart session refused: SessionExpired" in out


def _entry(version: int, commit_id: str, derived_from: dict[str, int]) -> oribus.Version:
    value = {"by": "a", "rev": version, "derived_from": derived_from}
    return oribus.Version(version, value, "a", "s", commit_id, 0.0)


def test_checker_counts_only_provably_stale_commits():
    ledger = Ledger()
    # "c1" writes x v1; "c2" reads x v1 and writes y v1 after c1's acknowledgement: fine.
    ledger.before_send("c1")
    ledger.acknowledged("c1", {"x": 1})
    ledger.before_send("c2")
    ledger.acknowledged("c2", {"y": 1})
    # "c3" reads x v1 and y v1, then "c4" writes x v2 and is acknowledged before c3 is sent.
    ledger.before_send("c4")
    ledger.acknowledged("c4", {"x": 2})
    ledger.before_send("c3")
    ledger.acknowledged("c3", {"y": 2})
    # "c5" writes x v3 while "c6" (also reading x v2) is in flight: overlapping, not counted.
    ledger.before_send("c5")
    ledger.before_send("c6")
    ledger.acknowledged("c5", {"x": 3})
    ledger.acknowledged("c6", {"z": 1})
    histories = {
        "x": {1: _entry(1, "c1", {"x": 0}), 2: _entry(2, "c4", {"x": 1}), 3: _entry(3, "c5", {"x": 2})},
        "y": {1: _entry(1, "c2", {"x": 1, "y": 0}), 2: _entry(2, "c3", {"x": 1, "y": 1})},
        "z": {1: _entry(1, "c6", {"x": 2, "z": 0})},
    }
    result = audit(histories, ledger)
    assert result.checked == 6
    assert [(c.key, c.version, c.input_key) for c in result.corruptions] == [("y", 2, "x")]
    # a write of a key that skipped a version (lost update) is always counted
    histories["x"][3] = _entry(3, "c5", {"x": 1})
    assert [(c.key, c.version) for c in audit(histories, ledger).corruptions] == [("x", 3), ("y", 2)]
