"""``oribus up`` says it is serving only once every replica group member is a voter
(``oribus.hosts.up_groups.wait_for_voters``; specs/replication.md §7)."""

from __future__ import annotations

import asyncio

from oribus.hosts.up_groups import wait_for_voters


def test_it_waits_until_every_member_is_a_voter() -> None:
    answers = [["shard 0 member 2 (not answering)"], ["shard 0 member 2 (a learner, catching up)"], []]
    asked = []

    async def not_voters() -> list[str]:
        asked.append(1)
        return answers[min(len(asked), len(answers)) - 1]

    assert asyncio.run(wait_for_voters(not_voters, timeout=5.0, poll=0.001)) == []
    assert len(asked) == 3


def test_past_its_timeout_it_names_who_is_not_a_voter_yet() -> None:
    async def not_voters() -> list[str]:
        return ["shard 1 member 0 (a learner, catching up)"]

    assert asyncio.run(wait_for_voters(not_voters, timeout=0.05, poll=0.01)) == [
        "shard 1 member 0 (a learner, catching up)"]
