"""The one table from oribus errors to HTTP statuses (``gateway/errors.py``), and the S-Bus
routes' refusals, which take their statuses from it."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from oribus.errors import (
    Conflict,
    HistoryTruncated,
    InvalidRequest,
    OribusError,
    SessionExpired,
    Unavailable,
    ValueTooLarge,
)
from oribus.gateway.errors import HTTP_STATUS, http_status, status_of
from oribus.gateway.sbus import SBUS_ERRORS, SbusError, SbusRoutes, sbus_status

Table = tuple[tuple[type[OribusError], int], ...]


def error_tree() -> list[type[OribusError]]:
    """Every error class oribus defines (those of other modules, such as this one, left out,
    and those of the integrations: clients of the SDK, their errors never cross a wire)."""
    found: list[type[OribusError]] = []
    todo: list[type[OribusError]] = [OribusError]
    while todo:
        cls = todo.pop()
        if (cls.__module__.startswith("oribus.") and not cls.__module__.startswith("oribus.integrations.")
                and cls not in found):
            found.append(cls)
        todo.extend(cls.__subclasses__())
    return found


def unlisted(classes: list[type[OribusError]], table: Table) -> list[type[OribusError]]:
    """Classes the table has no entry of their own for (they would fall back on a base's status)."""
    listed = {cls for cls, _ in table}
    return [cls for cls in classes if cls not in listed]


def shadowed(table: Table) -> list[type[OribusError]]:
    """Entries an earlier entry of a base class decides for (the table is most specific first)."""
    return [cls for i, (cls, _) in enumerate(table) if any(issubclass(cls, base) for base, _ in table[:i])]


def test_every_error_class_has_its_own_entry_in_the_one_table():
    tree = error_tree()
    assert {Conflict, SessionExpired, ValueTooLarge, HistoryTruncated, Unavailable} <= set(tree)
    assert unlisted(tree, HTTP_STATUS) == []
    assert shadowed(HTTP_STATUS) == []
    for cls, status in HTTP_STATUS:
        assert status_of(cls) == status, cls

    class Planted(InvalidRequest):  # an error added to the tree but not to the table
        code = "Planted"

    assert unlisted([*tree, Planted], HTTP_STATUS) == [Planted]
    misordered = ((InvalidRequest, 400), (ValueTooLarge, 413), (OribusError, 500))
    assert shadowed(misordered) == [ValueTooLarge]


def raising(error: Exception):
    async def handler(request):
        raise error

    handler.__name__ = "handler"
    return handler


async def sbus_answer(error: Exception) -> tuple[int, dict]:
    """What an S-Bus route answers when its handler raises ``error``."""
    routes = SbusRoutes(SimpleNamespace(bus=None))
    response = await routes._wrap(raising(error))(None)
    return response.status, json.loads(response.body)


@pytest.mark.parametrize("cls", error_tree(), ids=lambda cls: cls.__name__)
async def test_an_sbus_route_answers_an_oribus_error_with_the_tables_status(cls):
    error = cls("boom", key="k")
    status, body = await sbus_answer(error)
    assert status == http_status(error)
    assert body["error"] == ("DeltaTooLarge" if cls is ValueTooLarge else cls.code)
    assert body["detail"] == "boom"


async def test_sbus_error_bodies_keep_their_shape():
    assert await sbus_answer(SessionExpired("gone", shard=1)) == (410, {"error": "SessionExpired", "detail": "gone"})
    assert await sbus_answer(ValueTooLarge("big", key="k", size=9)) == (
        413, {"error": "DeltaTooLarge", "detail": "big", "key": "k", "size": 9})
    assert await sbus_answer(InvalidRequest("bad", key="k")) == (
        400, {"error": "InvalidRequest", "detail": "bad", "key": "k"})
    assert await sbus_answer(Unavailable("down", shard=2)) == (503, {"error": "Unavailable", "detail": "down"})
    assert await sbus_answer(Conflict("refused")) == (409, {"error": "Conflict", "detail": "refused"})
    assert await sbus_answer(SbusError("ShardNotFound", "no key", key="k")) == (
        404, {"error": "ShardNotFound", "detail": "no key", "key": "k"})


def test_sbus_codes_keep_sbus_statuses_and_agree_with_the_table():
    # S-Bus's own statuses (S-Bus compatibility): a change to the one table that would move
    # one of them fails here
    assert {code: sbus_status(code) for code in SBUS_ERRORS} == {
        "VersionMismatch": 409, "CrossShardStale": 409, "TokenConflict": 409, "ShardAlreadyExists": 409,
        "SessionExpired": 410, "DeltaTooLarge": 413, "InvalidRequest": 400,
        "ShardNotFound": 404, "VersionNotFound": 404, "Forbidden": 403,
    }
    for code, meaning in SBUS_ERRORS.items():
        if not isinstance(meaning, int):
            assert sbus_status(code) == status_of(meaning) == SbusError(code, "x").status, code
