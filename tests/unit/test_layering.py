"""The package's layers import only downwards.

The SDK (``oribus/client/``) speaks to a bus through ``oribus.contract`` and never
imports a server module; the wire codec, the shards and the delivery log never
import the bus; the contract itself sits just above ``types``, ``errors`` and
``protocol``. Every ``import`` / ``from ... import`` of an ``oribus`` module is
checked, at module level and inside functions alike (not those only for annotations).
"""

from __future__ import annotations

import ast
from pathlib import Path

import oribus

PACKAGE = Path(oribus.__file__).parent

# (files the rule covers, as paths relative to the package, "" for all of it; forbidden modules)
RULES: list[tuple[tuple[str, ...], tuple[str, ...]]] = [
    (("client/",), ("oribus.bus", "oribus.shards", "oribus.sim")),
    (("wire.py", "shards/", "delivery_log/", "contract"), ("oribus.bus",)),
]
# The contract may import only these (and the standard library).
CONTRACT_ALLOWED = ("oribus.types", "oribus.errors", "oribus.protocol", "oribus.contract")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _package_of(path: Path) -> list[str]:
    package = _module_name(path).split(".")
    if path.name != "__init__.py":
        package.pop()
    return package


def _imports(source: str, package: list[str]) -> list[tuple[int, str]]:
    """(line, module) of every oribus module ``source`` (a module of ``package``) imports,
    relative imports resolved."""
    tree = ast.parse(source)
    # imports only for annotations (under ``if TYPE_CHECKING:``) never run, so make no loop
    typing_only = {id(n) for block in ast.walk(tree)
                   if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
                   for stmt in block.body for n in ast.walk(stmt)}
    found = []
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # ``from oribus import wire`` imports the module oribus.wire
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
    return [(line, m) for line, m in found if m == "oribus" or m.startswith("oribus.")]


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def _covered(rel: str, scopes: tuple[str, ...]) -> bool:
    return any(rel.startswith(s) if s.endswith("/") else rel == s or rel.startswith(s + "/") or
               rel.startswith(s + ".") for s in scopes)


def layering_violations() -> list[str]:
    violations = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        for line, module in _imports(path.read_text(encoding="utf-8"), _package_of(path)):
            for scopes, forbidden in RULES:
                if _covered(rel, scopes) and any(_under(module, f) for f in forbidden):
                    violations.append(f"oribus/{rel}:{line} imports {module}")
            # the gateway's app imports its route modules, so they must not import it back
            if (rel.startswith("bus/gateway/") and rel not in ("bus/gateway/app.py", "bus/gateway/__init__.py")
                    and _under(module, "oribus.bus.gateway.app")):
                violations.append(f"oribus/{rel}:{line} imports {module} (an import loop with the app)")
            if _covered(rel, ("contract",)) and not any(_under(module, a) for a in CONTRACT_ALLOWED):
                violations.append(f"oribus/{rel}:{line} imports {module} (the contract imports only "
                                  f"{', '.join(CONTRACT_ALLOWED[:3])})")
    return sorted(set(violations))


def test_contract_module_exists():
    assert (PACKAGE / "contract.py").exists() or (PACKAGE / "contract").is_dir()


def test_no_upward_imports():
    violations = layering_violations()
    for v in violations:
        print(v)
    assert not violations, "upward imports:\n" + "\n".join(violations)


def test_the_check_sees_function_level_and_relative_imports():
    # the collector must not miss the forms an upward import can take
    source = ("import json\n"
              "def f():\n    from oribus.bus.bus import Bus\n"
              "from oribus import bus\n"
              "import oribus.sim\n"
              "from ..shards import store\n"
              "if TYPE_CHECKING:\n    from oribus.bus.gateway.app import HttpGateway\n")
    modules = {m for _, m in _imports(source, ["oribus", "client"])}
    assert modules == {"oribus.bus.bus.Bus", "oribus.bus", "oribus.sim", "oribus.shards.store"}
