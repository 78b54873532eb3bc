"""The default addresses and the largest version are written once in oribus's code, where they
are defined, and imported everywhere else (a copy would drift from the original)."""

from __future__ import annotations

import ast
import operator
from pathlib import Path

from oribus.gateway import DEFAULT_HTTP
from oribus.rpc.wire import DEFAULT_BUS_ADDRESS
from oribus.types import MAX_VERSION

PACKAGE = Path(__file__).resolve().parents[2] / "oribus"
_FOLD = {ast.LShift: operator.lshift, ast.Pow: operator.pow, ast.Sub: operator.sub, ast.Add: operator.add}


def _value(node: ast.AST) -> object:
    """The value of a constant expression such as ``(1 << 63) - 1`` (None: not constant)."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _FOLD:
        left, right = _value(node.left), _value(node.right)
        if isinstance(left, int) and isinstance(right, int) and not (isinstance(node.op, ast.Pow) and right > 64):
            return _FOLD[type(node.op)](left, right)
    return None


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the docstring nodes (their examples may name the default address)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                out.add(id(first.value))
    return out


def places(source: str, wanted) -> list[int]:
    """Lines of ``source`` with a constant (outside docstrings) for which ``wanted`` is true."""
    tree = ast.parse(source)
    skip = _docstrings(tree)
    return sorted({
        node.lineno for node in ast.walk(tree)
        if isinstance(node, ast.Constant | ast.BinOp) and id(node) not in skip and wanted(_value(node))
    })


def is_default_port(v: object) -> bool:
    ports = (DEFAULT_BUS_ADDRESS.rsplit(":", 1)[1], DEFAULT_HTTP.rsplit(":", 1)[1])
    return isinstance(v, str) and any(f":{port}" in v for port in ports)


def is_max_version(v: object) -> bool:
    return isinstance(v, int) and v in (MAX_VERSION, MAX_VERSION + 1)


def test_the_default_addresses_and_the_largest_version_are_defined_once():
    found: dict[str, list[str]] = {"port": [], "version": []}
    for path in sorted(PACKAGE.rglob("*.py")):
        source = path.read_text()
        where = path.relative_to(PACKAGE.parent).as_posix()
        found["port"] += [f"{where}:{n}" for n in places(source, is_default_port)]
        found["version"] += [f"{where}:{n}" for n in places(source, is_max_version)]
    assert [p.rsplit(":", 1)[0] for p in found["port"]] == ["oribus/gateway/app.py", "oribus/rpc/wire.py"], found
    assert [p.rsplit(":", 1)[0] for p in found["version"]] == ["oribus/types.py"], found


def test_a_copy_is_found():
    planted = '''
"""Connect to 127.0.0.1:7700 (a docstring may say so)."""
LISTEN = "0.0.0.0:7700"
LIMIT = (1 << 63) - 1
OTHER = 2**63
def f(v=9223372036854775807):
    """Or here: 127.0.0.1:7780."""
    return "http://localhost:7780/"
'''
    assert places(planted, is_default_port) == [3, 8]
    assert places(planted, is_max_version) == [4, 5, 6]
