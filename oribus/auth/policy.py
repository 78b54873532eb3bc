"""The access rules, ``D/policy.yaml`` (specs/auth.md §4).

::

    roles:
      planner:
        read: ["plans/*", "shared/*"]     # patterns: a literal key, or a prefix ending in *
        write: ["plans/*"]                # ("*" alone: every key)
        watch: ["plans/*"]
        history: ["plans/*"]
        rollback: []
      orchestrator:
        read: ["*"]
        write: ["*"]
        act_for: ["*"]                    # agents it may name in requests ("*": any)
      ops:
        admin: true                       # /admin/*, every session, the dashboard

Every field is optional (absent: nothing granted). Anything else — an unknown field, a
pattern with ``*`` other than at its end, a role that is not a map — refuses the whole
file with a message naming where: a policy half understood would grant or deny what its
author did not write.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import yaml

from oribus.errors import InvalidRequest

OPERATIONS = ("read", "write", "watch", "history", "rollback")


@dataclass(frozen=True)
class Grant:
    """The keys one operation is granted on: literal keys and prefixes (``everything``: ``*``)."""

    keys: frozenset[str] = frozenset()
    prefixes: tuple[str, ...] = ()
    patterns: tuple[str, ...] = ()  # as written, for messages

    @property
    def everything(self) -> bool:
        return "" in self.prefixes

    def covers_key(self, key: str) -> str | None:
        """The pattern granting ``key``, or None."""
        if key in self.keys:
            return key
        for p in self.prefixes:
            if key.startswith(p):
                return p + "*"
        return None

    def covers_prefix(self, prefix: str) -> str | None:
        """The pattern granting every key under ``prefix`` (a watch), or None. A literal key
        never does: a watch on ``a/x`` also sees ``a/x2``."""
        for p in self.prefixes:
            if prefix.startswith(p):
                return p + "*"
        return None


def _grant(patterns: Iterable[str]) -> Grant:
    keys: set[str] = set()
    prefixes: list[str] = []
    for p in patterns:
        if p.endswith("*"):
            prefixes.append(p[:-1])
        else:
            keys.add(p)
    return Grant(frozenset(keys), tuple(prefixes), tuple(patterns))


@dataclass(frozen=True)
class Role:
    name: str
    grants: dict[str, Grant] = field(default_factory=dict)  # operation -> grant
    admin: bool = False
    act_for: tuple[str, ...] = ()

    def grant(self, operation: str) -> Grant:
        return self.grants.get(operation) or _EMPTY


_EMPTY = Grant()


@dataclass(frozen=True)
class Policy:
    roles: dict[str, Role] = field(default_factory=dict)


def _patterns(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise InvalidRequest(f"{where} must be a list of patterns")
    for p in value:
        if not isinstance(p, str) or not p:
            raise InvalidRequest(f"{where}: a pattern is a non-empty string, not {p!r}")
        if "*" in p[:-1]:
            raise InvalidRequest(f"{where}: {p!r} has a * other than at its end (a pattern is a key or a prefix*)")
    return value


def parse_policy(data: Any, source: str = "policy") -> Policy:
    """A ``Policy`` from the YAML document's value; InvalidRequest naming the first problem."""
    if not isinstance(data, dict) or set(data) - {"roles"}:
        raise InvalidRequest(f"{source}: the policy is a map with one field, roles")
    raw_roles = data.get("roles") or {}
    if not isinstance(raw_roles, dict):
        raise InvalidRequest(f"{source}: roles must be a map of role name to its grants")
    roles: dict[str, Role] = {}
    for name, spec in raw_roles.items():
        where = f"{source}: role {name!r}"
        if not isinstance(name, str) or not name:
            raise InvalidRequest(f"{source}: a role name is a non-empty string, not {name!r}")
        spec = spec or {}
        if not isinstance(spec, dict):
            raise InvalidRequest(f"{where} must be a map")
        unknown = set(spec) - {*OPERATIONS, "admin", "act_for"}
        if unknown:
            raise InvalidRequest(f"{where}: unknown fields {sorted(unknown)} (known: {', '.join(OPERATIONS)}, "
                                 "admin, act_for)")
        admin = spec.get("admin", False)
        if not isinstance(admin, bool):
            raise InvalidRequest(f"{where}: admin must be true or false")
        act_for = spec.get("act_for") or []
        if not isinstance(act_for, list) or not all(isinstance(a, str) and a for a in act_for):
            raise InvalidRequest(f"{where}: act_for must be a list of agent names (or \"*\")")
        grants = {op: _grant(_patterns(spec.get(op), f"{where}, {op}")) for op in OPERATIONS}
        roles[name] = Role(name, grants, admin, tuple(act_for))
    return Policy(roles)


def load_policy_text(text: str, source: str = "policy.yaml") -> Policy:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise InvalidRequest(f"{source} is not valid YAML: {e}") from None
    return parse_policy(data, source)


STARTER_POLICY = """\
# oribus access rules (specs/auth.md §4). A pattern is a key or a prefix ending in *.
# Each role grants read, write, watch, history and rollback on patterns; admin: true grants
# the operator routes and every session; act_for lists agents it may name in requests.
# A change applies on a running bus within a second; a file that does not parse is
# refused and the previous rules stay.
roles:
  reader:
    read: ["*"]
    watch: ["*"]
    history: ["*"]
  writer:
    read: ["*"]
    write: ["*"]
    watch: ["*"]
    history: ["*"]
    rollback: ["*"]
  admin:
    read: ["*"]
    write: ["*"]
    watch: ["*"]
    history: ["*"]
    rollback: ["*"]
    admin: true
    act_for: ["*"]
"""
