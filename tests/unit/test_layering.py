"""The package's layers import only downwards.

From the top (specs/ARCHITECTURE.md, "Which layer may import which"): the entry points (``cli``, ``demo``,
``local``, ``sim``, ``verify``, ``testing``); the process hosts (``hosts/``); the SDK (``client/``) and the
transports (``gateway/``, ``rpc/``); the bus's logic (``bus/``) and the cluster metadata
(``meta/``); the shards (``shards/``, ``delivery_log/``); the contract, the messages and
the basic types. The SDK speaks to a bus through ``oribus.contract`` and the client half
of ``rpc/`` and never imports a server module; the bus reaches its shards only through
``ShardService`` (no transport, no host); nothing below the bus imports it. Every
``import`` / ``from ... import`` of an ``oribus`` module is checked, at module level and
inside functions alike (not those only for annotations).

``python tests/unit/test_layering.py`` (``make layers``) prints the import graph by
package in layers, its cycles and any upward import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import oribus

PACKAGE = Path(oribus.__file__).parent

# (files the rule covers, as paths relative to the package; forbidden modules)
ENTRY_POINTS = ("oribus.cli", "oribus.demo", "oribus.local", "oribus.sim", "oribus.verify", "oribus.testing")
SERVER_RPC = ("oribus.rpc.bus_server", "oribus.rpc.shard_server", "oribus.rpc.shard_client",
              "oribus.rpc.shard_codec", "oribus.rpc.stream_server")
RULES: list[tuple[tuple[str, ...], tuple[str, ...]]] = [
    # the SDK: the contract, the messages and the client half of rpc, nothing of a server
    (("client/",), ("oribus.bus", "oribus.shards", "oribus.delivery_log", "oribus.meta", "oribus.hosts",
                    "oribus.gateway", *SERVER_RPC, *ENTRY_POINTS)),
    # the transports serve a bus or a shard but never start one, nor speak HTTP/gRPC to each other
    (("rpc/",), ("oribus.hosts", "oribus.gateway", "oribus.client", *ENTRY_POINTS)),
    (("gateway/",), ("oribus.hosts", "oribus.rpc", "oribus.client", *ENTRY_POINTS)),
    # only the two servers of rpc/ import what they serve
    (("rpc/wire.py", "rpc/grpc_status.py", "rpc/bus_codec.py", "rpc/shard_codec.py", "rpc/mux_client.py",
      "rpc/mux_server.py", "rpc/bus_client.py", "rpc/shard_client.py", "rpc/frames.py", "rpc/stream_client.py",
      "rpc/stream_server.py"), ("oribus.bus",)),
    (("hosts/",), ("oribus.client", *ENTRY_POINTS)),
    # the bus's logic reaches its shards through ShardService only
    (("bus/",), ("oribus.rpc", "oribus.hosts", "oribus.gateway", "oribus.client", "oribus.meta",
                 *ENTRY_POINTS)),
    # the auth core (identities, tokens, rules) is a foundation: the bus and the transports use it
    (("auth/",), ("oribus.bus", "oribus.shards", "oribus.delivery_log", "oribus.meta", "oribus.rpc",
                  "oribus.gateway", "oribus.client", "oribus.hosts", "oribus.contract", "oribus.messages",
                  *ENTRY_POINTS)),
    (("meta/",), ("oribus.bus", "oribus.rpc", "oribus.hosts", "oribus.gateway", "oribus.client",
                  *ENTRY_POINTS)),
    (("shards/", "delivery_log/", "messages", "contract"),
     ("oribus.bus", "oribus.meta", "oribus.rpc", "oribus.hosts", "oribus.gateway", "oribus.client",
      *ENTRY_POINTS)),
]
# The contract may import only these (and the standard library).
CONTRACT_ALLOWED = ("oribus.types", "oribus.errors", "oribus.messages", "oribus.contract")
# The integrations (MCP, LangGraph, ...) are clients like any other: the public SDK and the
# contract's types (an allow-list: nothing else), never the bus, the shards, the transports'
# insides or a host.
INTEGRATIONS_ALLOWED = ("oribus.client", "oribus.errors", "oribus.types", "oribus.contract",
                        "oribus.integrations")


def _module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _package_of(path: Path, root: Path = PACKAGE) -> list[str]:
    package = _module_name(path, root).split(".")
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
            # ``from oribus.rpc import wire`` imports the module oribus.rpc.wire
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
    return [(line, m) for line, m in found if m == "oribus" or m.startswith("oribus.")]


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def _covered(rel: str, scopes: tuple[str, ...]) -> bool:
    return any(rel.startswith(s) if s.endswith("/") else rel == s or rel.startswith(s + "/") or
               rel.startswith(s + ".") for s in scopes)


def layering_violations(package: Path = PACKAGE) -> list[str]:
    violations = []
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package).as_posix()
        for line, module in _imports(path.read_text(encoding="utf-8"), _package_of(path, package)):
            for scopes, forbidden in RULES:
                if _covered(rel, scopes) and any(_under(module, f) for f in forbidden):
                    violations.append(f"oribus/{rel}:{line} imports {module}")
            # the gateway's app imports its route modules, so they must not import it back
            if (rel.startswith("gateway/") and rel not in ("gateway/app.py", "gateway/__init__.py")
                    and _under(module, "oribus.gateway.app")):
                violations.append(f"oribus/{rel}:{line} imports {module} (an import loop with the app)")
            if (_covered(rel, ("integrations/",)) and module != "oribus"
                    and not any(_under(module, a) for a in INTEGRATIONS_ALLOWED)):
                violations.append(f"oribus/{rel}:{line} imports {module} (an integration imports only "
                                  "the public SDK: oribus, oribus.client, oribus.errors, oribus.types)")
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


@pytest.mark.parametrize(("rel", "source"), [
    ("client/session.py", "from oribus.bus.bus import Bus\n"),
    ("client/remote.py", "from oribus.rpc.shard_client import GrpcShardClient\n"),
    ("bus/bus.py", "def f():\n    from oribus.rpc import bus_server\n"),
    ("rpc/wire.py", "from ..bus import coordinator\n"),
    ("shards/shard.py", "import oribus.meta.cluster_meta\n"),
    ("gateway/native.py", "from oribus.gateway.app import LOG_FIELDS\n"),
    ("contract.py", "from oribus.tls import TlsConfig\n"),
    ("auth/rules.py", "from oribus.bus.sessions import SessionTable\n"),
    ("integrations/mcp/server.py", "from oribus.hosts.embedded import EmbeddedEngine\n"),
    ("integrations/langgraph/saver.py", "from oribus.rpc.bus_client import RemoteBus\n"),
    ("integrations/langgraph/store.py", "from oribus.hosts.embedded import EmbeddedEngine\n"),
    ("integrations/langgraph/keys.py", "from oribus.local import open_local\n"),
])
def test_each_rule_reports_what_it_forbids(tmp_path, rel, source):
    root = tmp_path / "oribus"
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_text(source)
    (root / "client" / "ok.py").parent.mkdir(parents=True, exist_ok=True)
    (root / "client" / "ok.py").write_text("from oribus.contract import BusService\nfrom oribus.rpc import wire\n")
    assert [v.split(":")[0] for v in layering_violations(root)] == [f"oribus/{rel}"]


def test_the_check_sees_function_level_and_relative_imports():
    # the collector must not miss the forms an upward import can take
    source = ("import json\n"
              "def f():\n    from oribus.bus.bus import Bus\n"
              "from oribus import bus\n"
              "import oribus.sim\n"
              "from ..shards import store\n"
              "if TYPE_CHECKING:\n    from oribus.gateway.app import HttpGateway\n")
    modules = {m for _, m in _imports(source, ["oribus", "client"])}
    assert modules == {"oribus.bus.bus.Bus", "oribus.bus", "oribus.sim", "oribus.shards.store"}


# ---- the import graph by package, printed in layers (``make layers``) ----------------------


def _group(module: str) -> str:
    """The node a module counts under: its subpackage of oribus (``oribus.bus``), or the
    top-level module itself (``oribus.types``)."""
    return ".".join(module.split(".")[:2])


def import_graph() -> dict[str, set[str]]:
    """node -> the nodes it imports (at run time), over every module of the package."""
    graph: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        node = _group(_module_name(path))
        graph.setdefault(node, set())
        for _, module in _imports(path.read_text(encoding="utf-8"), _package_of(path)):
            target = _group(module)
            if module == "oribus" or target == node:
                continue
            # ``from oribus.x import name`` names a module or a member; either way it is node x
            graph[node].add(target)
    for targets in list(graph.values()):
        for t in targets:
            graph.setdefault(t, set())
    return graph


def layers(graph: dict[str, set[str]]) -> tuple[list[list[str]], list[list[str]]]:
    """The graph's layers bottom-up (a node sits one above the highest node it imports) and
    its import cycles (strongly connected components of more than one node), each cycle
    counted as one node."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(v: str) -> None:  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    component_of = {v: i for i, c in enumerate(components) for v in c}
    level: dict[int, int] = {}
    for i, component in enumerate(components):  # Tarjan emits components dependencies-first
        deps = {component_of[w] for v in component for w in graph[v]} - {i}
        level[i] = 1 + max((level[d] for d in deps), default=-1)
    rows: list[list[str]] = [[] for _ in range(1 + max(level.values(), default=-1))]
    for i, component in enumerate(components):
        rows[level[i]].append(" ⇄ ".join(component) if len(component) > 1 else component[0])
    return [sorted(r) for r in rows], [c for c in components if len(c) > 1]


def test_the_packages_form_layers_without_cycles():
    _, cycles = layers(import_graph())
    assert not cycles, f"import cycles between packages: {cycles}"


def main() -> None:
    graph = import_graph()
    rows, cycles = layers(graph)
    short = lambda n: n.removeprefix("oribus.")  # noqa: E731
    print(f"{sum(len(t) for t in graph.values())} imports between {len(graph)} packages and "
          f"top-level modules of {PACKAGE}; layer 0 imports nothing of oribus")
    for depth in range(len(rows) - 1, -1, -1):
        print(f"  layer {depth:2}: " + ", ".join(short(n) for n in rows[depth]))
    print(f"cycles: {len(cycles)}" + "".join(f"\n  {' ⇄ '.join(map(short, c))}" for c in cycles))
    violations = layering_violations()
    print(f"upward imports: {len(violations)}" + "".join(f"\n  {v}" for v in violations))


if __name__ == "__main__":
    main()
