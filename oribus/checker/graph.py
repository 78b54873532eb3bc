"""The dependency graph over committed transactions, and its cycles (Adya; Elle).

Nodes are committed transactions. Edges, each labelled with the key and the
versions that justify it:

- ``ww``: T wrote a version of k and U wrote the next one (version order);
- ``wr``: U read the version of k that T wrote;
- ``rw``: U read a version of k and T wrote the next one (anti-dependency);
- ``rt``: T completed before U was invoked (real-time order).

A serializable execution has no cycle of ww/wr/rw edges; a strictly
serializable one none with rt edges either. ``find_cycles`` runs Tarjan's
strongly connected components on the whole graph, then looks inside each
component for one short cycle, trying the most telling class first and
classifying it by the edges it needs (Adya 1999; Kingsbury & Alvaro, Elle, 2020):

    G0         only ww edges (dirty write)
    G1c        ww and wr edges (circular information flow)
    G-single   exactly one rw edge (read skew, lost update)
    G2         two or more rw edges (write skew)

and each again with rt edges allowed (``G0-realtime`` ...) for components that
have no cycle without them. A cycle is found by breadth-first search, so it is
the shortest through its starting node; for G-single the search goes from the
head of each rw edge back to its tail over ww/wr edges only. One cycle is
reported per component, with the component's size: enough to show the
anomaly and where to look.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

WW, WR, RW, RT = "ww", "wr", "rw", "rt"
_PREFERENCE = (WW, WR, RW, RT)  # the label a cycle step is given when an edge has several


@dataclass(frozen=True, slots=True)
class Edge:
    kind: str  # ww | wr | rw | rt
    key: str | None = None
    detail: str = ""  # which versions or elements justify it


@dataclass
class Cycle:
    kind: str  # G0, G1c, G-single, G2, each optionally with -realtime
    nodes: list[int]  # transaction ids, in cycle order (the first is not repeated at the end)
    steps: list[tuple[int, int, Edge]]  # (from, to, edge) for each step
    component_size: int

    def describe_steps(self) -> list[dict[str, Any]]:
        return [
            {"from": a, "to": b, "type": e.kind, "key": e.key, "detail": e.detail}
            for a, b, e in self.steps
        ]


class DepGraph:
    """A directed multigraph of transaction ids with labelled edges."""

    def __init__(self) -> None:
        self.out: dict[int, dict[int, list[Edge]]] = {}

    def add_node(self, node: int) -> None:
        self.out.setdefault(node, {})

    def add(self, a: int, b: int, kind: str, key: str | None = None, detail: str = "") -> None:
        """Add an edge a -> b (self-edges are ignored: a transaction never depends on itself)."""
        if a == b:
            return
        self.add_node(b)
        edges = self.out.setdefault(a, {}).setdefault(b, [])
        if len(edges) < 8 and not any(e.kind == kind and e.key == key for e in edges):
            edges.append(Edge(kind, key, detail))

    def edge_count(self) -> int:
        return sum(len(targets) for targets in self.out.values())

    def kinds(self, a: int, b: int) -> list[Edge]:
        return self.out.get(a, {}).get(b, [])

    # ---- components ---------------------------------------------------------------------

    def sccs(self, nodes: Iterable[int] | None = None, allowed: frozenset[str] | None = None) -> list[list[int]]:
        """Strongly connected components with more than one node (Tarjan, iterative).

        ``nodes`` restricts the graph to a subset, ``allowed`` to edges of those kinds.
        """
        scope = set(self.out if nodes is None else nodes)
        index: dict[int, int] = {}
        low: dict[int, int] = {}
        on_stack: set[int] = set()
        stack: list[int] = []
        result: list[list[int]] = []
        counter = 0
        for root in scope:
            if root in index:
                continue
            work: list[tuple[int, Any]] = [(root, iter(self._succ(root, scope, allowed)))]
            index[root] = low[root] = counter
            counter += 1
            stack.append(root)
            on_stack.add(root)
            while work:
                node, it = work[-1]
                advanced = False
                for nxt in it:
                    if nxt not in index:
                        index[nxt] = low[nxt] = counter
                        counter += 1
                        stack.append(nxt)
                        on_stack.add(nxt)
                        work.append((nxt, iter(self._succ(nxt, scope, allowed))))
                        advanced = True
                        break
                    if nxt in on_stack:
                        low[node] = min(low[node], index[nxt])
                if advanced:
                    continue
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        component.append(w)
                        if w == node:
                            break
                    if len(component) > 1:
                        result.append(component)
        return result

    def _succ(self, node: int, scope: set[int], allowed: frozenset[str] | None) -> list[int]:
        return [
            b for b, edges in self.out.get(node, {}).items()
            if b in scope and (allowed is None or any(e.kind in allowed for e in edges))
        ]

    # ---- cycles -------------------------------------------------------------------------

    def _path(self, start: int, goal: int, scope: set[int], allowed: frozenset[str]) -> list[int] | None:
        """The shortest path start -> ... -> goal over allowed edges inside scope (BFS)."""
        parent: dict[int, int] = {start: start}
        queue = deque([start])
        while queue:
            node = queue.popleft()
            for nxt in self._succ(node, scope, allowed):
                if nxt == goal:
                    path = [node]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    path.reverse()
                    return [*path, goal]
                if nxt not in parent:
                    parent[nxt] = node
                    queue.append(nxt)
        return None

    def _label(self, a: int, b: int, allowed: frozenset[str]) -> Edge:
        edges = [e for e in self.kinds(a, b) if e.kind in allowed]
        return min(edges, key=lambda e: _PREFERENCE.index(e.kind))

    def _cycle_from(self, nodes: list[int], allowed: frozenset[str], forced: tuple[int, int, Edge] | None,
                    size: int) -> Cycle:
        steps = []
        ring = [*nodes, nodes[0]]
        for a, b in zip(ring, ring[1:], strict=False):
            if forced is not None and (a, b) == forced[:2]:
                steps.append(forced)
            else:
                steps.append((a, b, self._label(a, b, allowed)))
        return Cycle(classify(steps), list(nodes), steps, size)

    def _any_cycle(self, component: set[int], allowed: frozenset[str]) -> Cycle | None:
        for sub in self.sccs(component, allowed):
            start = min(sub)
            path = self._path(start, start, set(sub), allowed)
            if path is not None:
                return self._cycle_from(path[:-1], allowed, None, len(component))
        return None

    def _single_rw_cycle(self, component: set[int], others: frozenset[str]) -> Cycle | None:
        """A cycle with exactly one rw edge: rw a -> b, then b back to a over ``others`` edges."""
        rw_edges = [
            (a, b, next(e for e in edges if e.kind == RW))
            for a in sorted(component)
            for b, edges in self.out.get(a, {}).items()
            if b in component and any(e.kind == RW for e in edges)
        ]
        if not rw_edges:
            return None
        # Cheap first pass: a and b in one component of the ``others`` subgraph.
        where = {n: i for i, sub in enumerate(self.sccs(component, others)) for n in sub}
        ordered = sorted(rw_edges, key=lambda t: not (t[0] in where and where.get(t[1]) == where[t[0]]))
        reachable: dict[int, set[int]] = {}
        for a, b, rw in ordered:
            if b not in reachable:
                reachable[b] = self._reach(b, component, others)
            if a in reachable[b]:
                path = self._path(b, a, component, others)
                if path is not None:
                    return self._cycle_from([a, *path[:-1]], others, (a, b, rw), len(component))
        return None

    def _reach(self, start: int, scope: set[int], allowed: frozenset[str]) -> set[int]:
        seen = {start}
        queue = deque([start])
        while queue:
            for nxt in self._succ(queue.popleft(), scope, allowed):
                if nxt not in seen:
                    seen.add(nxt)
                    queue.append(nxt)
        return seen

    def find_cycles(self) -> list[Cycle]:
        """One classified cycle per strongly connected component (see the module docstring)."""
        found: list[Cycle] = []
        for comp in self.sccs():
            component = set(comp)
            cycle = None
            for realtime in (False, True):
                extra = {RT} if realtime else set()
                cycle = (
                    self._any_cycle(component, frozenset({WW, *extra}))
                    or self._any_cycle(component, frozenset({WW, WR, *extra}))
                    or self._single_rw_cycle(component, frozenset({WW, WR, *extra}))
                    or self._any_cycle(component, frozenset({WW, WR, RW, *extra}))
                )
                if cycle is not None:
                    break
            if cycle is not None:
                found.append(cycle)
        return found


def classify(steps: list[tuple[int, int, Edge]]) -> str:
    """Adya's class of a cycle from the labels of its steps."""
    kinds = [e.kind for _, _, e in steps]
    rw = kinds.count(RW)
    if rw == 0:
        name = "G0" if WR not in kinds else "G1c"
    elif rw == 1:
        name = "G-single"
    else:
        name = "G2"
    return name + ("-realtime" if RT in kinds else "")
