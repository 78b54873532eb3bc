"""Commit ids sort by the age of the work, and a refused session's retries keep its age.

Shards settle waits between commits by comparing ids (wait-die, PROTOCOL.md §5.8 rule 7): the
older waits, the younger is refused. If each retry of a refused step drew a fresh, younger id,
a step on a hot key could be refused until its retries ran out.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from oribus.client.session import AsyncSession, commit_id_born, new_commit_id
from oribus.contract import CommitResult
from oribus.errors import Conflict, InvalidRequest, Stale


def test_ids_sort_by_age_not_by_creation_order() -> None:
    young = new_commit_id(2_000_000)
    old = new_commit_id(1_000_000)  # made later, but for older work
    assert old < young
    assert commit_id_born(old) == 1_000_000 and commit_id_born(young) == 2_000_000


def test_ids_are_unique_within_one_millisecond() -> None:
    ids = {new_commit_id(5) for _ in range(1000)}
    assert len(ids) == 1000


def test_age_of_ids_made_elsewhere_is_unknown() -> None:
    assert commit_id_born("my-own-id") is None
    assert commit_id_born("zzzzzzzzzzz-x") is None
    assert commit_id_born("") is None


class ScriptedBus:
    """A bus whose commits answer from a script (refuse or accept), recording the ids."""

    def __init__(self, answers: list[bool]) -> None:
        self.answers = answers
        self.ids: list[str] = []

    async def commit(self, req):  # noqa: ANN001, ANN201 - the one bus call these tests make
        self.ids.append(req.commit_id)
        if not self.answers.pop(0):
            raise Conflict("stale read", stale=[Stale("k", 1, 2, "stale_read")])
        return CommitResult(req.commit_id, {"k": 1}, {}, False)


def _run(coro):  # noqa: ANN001, ANN202
    return asyncio.run(coro)


def test_a_refused_sessions_next_commits_keep_its_age_until_one_goes_through() -> None:
    bus = ScriptedBus([False, False, True, True])
    s = AsyncSession(bus, "a")  # type: ignore[arg-type]

    async def go() -> None:
        for _ in range(2):
            with pytest.raises(Conflict):
                await s.commit({"k": 1})
            await asyncio.sleep(0.01)  # the clock moves on between attempts
        await s.commit({"k": 1})
        await asyncio.sleep(0.01)
        await s.commit({"k": 2})

    before = time.time_ns() // 1_000_000
    _run(go())
    born = [commit_id_born(i) for i in bus.ids]
    assert len(set(bus.ids)) == 4
    assert born[0] is not None and born[0] >= before
    assert born[1] == born[0] and born[2] == born[0], "retries after a refusal keep the first's age"
    assert born[3] is not None and born[3] > born[0], "after an accepted commit, ids are new again"


def test_transactions_of_a_refused_session_keep_its_age() -> None:
    bus = ScriptedBus([False, True])
    s = AsyncSession(bus, "a")  # type: ignore[arg-type]

    async def go() -> None:
        tx = s.transaction()
        tx.put("k", 1)
        with pytest.raises(Conflict):
            await tx.commit()
        await asyncio.sleep(0.01)
        tx2 = s.transaction()
        tx2.put("k", 1)
        await tx2.commit()

    _run(go())
    assert commit_id_born(bus.ids[1]) == commit_id_born(bus.ids[0])
    assert bus.ids[1] != bus.ids[0]


def test_other_refusals_do_not_age_the_session() -> None:
    class Refusing(ScriptedBus):
        async def commit(self, req):  # noqa: ANN001, ANN201
            self.ids.append(req.commit_id)
            if len(self.ids) == 1:
                raise InvalidRequest("bad key")
            return CommitResult(req.commit_id, {"k": 1}, {}, False)

    bus = Refusing([])
    s = AsyncSession(bus, "a")  # type: ignore[arg-type]

    async def go() -> None:
        with pytest.raises(InvalidRequest):
            await s.commit({"k": 1})
        await asyncio.sleep(0.01)
        await s.commit({"k": 1})

    _run(go())
    a, b = (commit_id_born(i) for i in bus.ids)
    assert a is not None and b is not None and b > a
