"""What a tool answers: structured content for programs, the same in words for the model.

Every answer is a ``CallToolResult`` with ``structuredContent`` (a JSON object) and one
text block: a sentence saying what happened, then the same object as JSON (MCP asks
tools with structured content to also return it serialised, for hosts that only show
text). Errors are answers too (``isError``), never exceptions out of the server:

- an oribus error: ``{"error": code, "message", "details"}``;
- a refused commit: ``{"committed": false, "error": "Conflict", "conflicts": [...]}``,
  one row per offending key with the version the session had, the current version
  and value, and who wrote it (``written_by``: agent, session, commit id, time), so
  a model can re-plan from it.

Values are JSON; the bus stores msgpack, which also has bytes: those are shown as
``{"$bytes": base64}`` (as ``oribus get`` prints them).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mcp.types import CallToolResult, TextContent

from oribus.client import Item, Version
from oribus.errors import Conflict, OribusError, Stale


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON types (bytes as ``{"$bytes": base64}``, other keys as str)."""
    if isinstance(value, bytes):
        return {"$bytes": base64.b64encode(value).decode()}
    if isinstance(value, Mapping):
        return {k if isinstance(k, str) else str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def answer(summary: str, data: dict[str, Any], *, error: bool = False) -> CallToolResult:
    data = jsonable(data)
    text = summary + "\n" + json.dumps(data, ensure_ascii=False, indent=1)
    return CallToolResult(content=[TextContent(type="text", text=text)], structured_content=data, is_error=error)


def failure(e: OribusError, advice: str = "") -> CallToolResult:
    """An oribus error as a tool error; ``advice`` says what to do next."""
    data: dict[str, Any] = {"error": e.code, "message": e.message, "details": e.details}
    if advice:
        data["advice"] = advice
    return answer(f"{e.code}: {e.message}" + (f" {advice}" if advice else ""), data, error=True)


def item(i: Item) -> dict[str, Any]:
    return {"key": i.key, "value": i.value, "version": i.version, "exists": i.exists}


def writer(v: Version | None) -> dict[str, Any] | None:
    if v is None:
        return None
    return {"agent": v.agent, "session": v.session, "commit_id": v.commit_id, "committed_at": v.committed_at}


def version(v: Version) -> dict[str, Any]:
    return {"version": v.version, "value": v.value, "deleted": v.deleted, **(writer(v) or {})}


@dataclass
class ConflictRow:
    """One key that refused a commit, with what it is now."""

    stale: Stale
    current: Item  # read again after the refusal: a delivery, so a re-planned commit is checked against it
    written_by: Version | None  # the history entry of ``current.version`` (None: never written)


# Why a key refused a commit, in words (errors.Stale.reason).
_REASONS = {
    "stale_read": "changed since this session read it",
    "expected_version": "is not at the version the commit expected",
    "locked": "is being written by another commit right now",
    "aborted": "was part of an aborted attempt",
}


def refused(e: Conflict, rows: list[ConflictRow]) -> CallToolResult:
    """A refused commit: which keys changed, their current values and who wrote them."""
    conflicts = []
    lines = []
    for r in rows:
        by = writer(r.written_by)
        conflicts.append({
            "key": r.stale.key,
            "reason": r.stale.reason,
            "your_version": r.stale.version,
            "current_version": r.current.version,
            "current_value": r.current.value,
            "exists": r.current.exists,
            "written_by": by,
        })
        who = f" by agent {by['agent']!r}" if by else ""
        had = "never read" if r.stale.version is None else f"version {r.stale.version}"
        now = (f"now version {r.current.version}{who}: {json.dumps(jsonable(r.current.value), ensure_ascii=False)}"
               if r.current.exists else f"now version {r.current.version}, deleted or absent{who}")
        lines.append(f"- {r.stale.key} {_REASONS.get(r.stale.reason, r.stale.reason)} (you had {had}; {now})")
    summary = (
        "Commit refused: nothing was written, because what it was based on has changed.\n"
        + "\n".join(lines)
        + "\nThe current values above are now what this session has read: re-plan from them and "
          "commit again (or give up)."
    )
    data = {"committed": False, "error": e.code, "message": e.message, "conflicts": conflicts}
    return answer(summary, data, error=True)
