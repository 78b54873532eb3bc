"""Checking a recorded history: ``check(events) -> Report``.

What is checked (``specs/history.md``), and the anomaly kinds each check reports:

ORI / serializability
    The dependency graph over committed transactions (``graph.py``): cycles
    ``G0``, ``G1c``, ``G-single``, ``G2`` and their ``-realtime`` variants.
    Per key, the version order comes from the server's version numbers (what
    ``ok`` writes and reads report, and the final history's commit ids) and,
    for list-append keys, independently from the lists clients read: every
    read list is a prefix of every later one, so the longest list orders every
    append it holds, and a read list of length n was overwritten by the
    writer of element n. An acknowledged append that no list ever holds comes
    after every read that does not hold it (lists only grow).
Atomicity
    ``G1a``: a committed read (or the final state) holds a write of a
    transaction that certainly failed. ``G1b``: a list ends in the middle of
    one transaction's appends (an intermediate version). ``fractured-read``: a
    committed transaction saw T's write on one key and a version before T's
    write on another key it read. ``garbage-read``: a read saw an element or
    value no transaction wrote.
Durability (needs a ``final`` event)
    ``lost-write``: an acknowledged write is not in the final state: a
    list-append element missing from the final list, or a register version
    whose kept history entry names another commit or that lies beyond the
    final version. Versions older than the kept history cannot be checked;
    the report counts them and says so.
Idempotency
    ``duplicate-commit``: a commit id twice in one key's final history, or an
    element twice in one list (an append applied twice).
Version order
    ``version-gap``: a key's kept history skips a version or ends below the
    final version, or a client observed a version above the final one.
    ``version-conflict``: two transactions (or two different values) claim
    the same version of a key. ``incompatible-order``: a list that is not a
    prefix of the key's longest list, or of the list at a higher version.
Results
    ``incomplete-result``: an ``ok`` transaction was told the new version of
    some of its writes but not of all of them (a client that reports no
    version at all is not held to this).

``info`` transactions (outcome unknown) count as committed only when some
read or the final state holds one of their writes, or the final history
holds their commit id; otherwise they are left out.
"""

from __future__ import annotations

import bisect
import json
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from oribus.checker.graph import RT, RW, WR, WW, DepGraph
from oribus.checker.history import APPEND, READ, WRITE, Final, HistoryError, Txn, transactions

CATEGORIES = {
    "G0": "ori", "G1c": "ori", "G-single": "ori", "G2": "ori",
    "G0-realtime": "ori", "G1c-realtime": "ori", "G-single-realtime": "ori", "G2-realtime": "ori",
    "G1a": "atomicity", "G1b": "atomicity", "fractured-read": "atomicity", "garbage-read": "atomicity",
    "lost-write": "durability",
    "duplicate-commit": "idempotency",
    "version-gap": "version-order", "version-conflict": "version-order", "incompatible-order": "version-order",
    "incomplete-result": "result",
}
ORI_KINDS = frozenset(k for k, c in CATEGORIES.items() if c == "ori")


@dataclass
class Anomaly:
    """One violation: its kind (see CATEGORIES), what happened, and the transactions involved."""

    kind: str
    message: str
    ops: list[dict[str, Any]] = field(default_factory=list)  # Txn.describe() of each transaction
    edges: list[dict[str, Any]] = field(default_factory=list)  # for cycles: each step with its key

    @property
    def category(self) -> str:
        return CATEGORIES.get(self.kind, "other")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "category": self.category, "message": self.message,
                "ops": self.ops, "edges": self.edges}


@dataclass
class Report:
    """The outcome of ``check``: ``ok`` is True when no anomaly was found."""

    anomalies: list[Anomaly]
    counts: dict[str, int]
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.anomalies

    def by_kind(self) -> dict[str, int]:
        return dict(sorted(Counter(a.kind for a in self.anomalies).items()))

    def of_kind(self, *kinds: str) -> list[Anomaly]:
        return [a for a in self.anomalies if a.kind in kinds]

    def examples(self) -> dict[str, Anomaly]:
        """One minimal example per anomaly kind: the one involving the fewest transactions."""
        best: dict[str, Anomaly] = {}
        for a in self.anomalies:
            if a.kind not in best or len(a.ops) < len(best[a.kind].ops):
                best[a.kind] = a
        return best

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "counts": self.counts, "by_kind": self.by_kind(), "notes": self.notes,
                "anomalies": [a.to_dict() for a in self.anomalies]}

    def summary(self, limit: int = 20) -> str:
        c = self.counts
        lines = [
            f"{c.get('transactions', 0)} transactions: {c.get('ok', 0)} ok, {c.get('fail', 0)} failed, "
            f"{c.get('info', 0)} unknown ({c.get('info_committed', 0)} of them committed); "
            f"{c.get('committed', 0)} committed transactions checked over {c.get('keys', 0)} keys, "
            f"{c.get('edges', 0)} dependency edges",
        ]
        if self.ok:
            lines.append("no anomalies")
        else:
            kinds = ", ".join(f"{k} x{n}" for k, n in self.by_kind().items())
            lines.append(f"{len(self.anomalies)} anomalies: {kinds}")
            for a in self.anomalies[:limit]:
                lines.append(f"  [{a.kind}] {a.message}")
            if len(self.anomalies) > limit:
                lines.append(f"  ... and {len(self.anomalies) - limit} more")
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


def check(events: Sequence[Mapping[str, Any]], *, validated: bool = False) -> Report:
    """Check a history (a list of events as in ``specs/history.md``); raises HistoryError if
    malformed (``validated``: it came from ``read_history``, which checked it already)."""
    txns, final = transactions(events, validated=validated)
    return _Checker(txns, final).run()


# ---- the analysis ------------------------------------------------------------------------


_SCALARS = (int, str, float, bool, type(None))


def _canon(x: Any) -> Any:
    """A hashable stand-in for a JSON value."""
    if type(x) in _SCALARS:
        return x
    return json.dumps(x, sort_keys=True, separators=(",", ":"))


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list) else []


_AMBIGUOUS = object()  # a register value written by more than one transaction


@dataclass(slots=True)
class _Obs:
    """A value of a key someone saw: a committed read, the final state or a final history entry."""

    key: str
    version: int | None
    value: Any
    reader: Txn | None  # None for final state/history
    source: str  # "read T12", "final state", "final history"
    elems: list[Any]  # list keys: the list's elements (hashable stand-ins); [] otherwise


class _Checker:
    def __init__(self, txns: list[Txn], final: Final | None) -> None:
        self.txns = txns
        self.final = final
        self.by_id = {t.id: t for t in txns}
        self.anomalies: list[Anomaly] = []
        self.notes: list[str] = []
        self.graph = DepGraph()
        self.unverifiable = 0

    # -- helpers --

    def report(self, kind: str, message: str, txns: Sequence[Txn] = (), edges: list[dict] | None = None) -> None:
        seen: set[int] = set()
        ops = []
        for t in txns:
            if t.id not in seen:
                seen.add(t.id)
                ops.append(t.describe())
        self.anomalies.append(Anomaly(kind, message, ops, edges or []))

    @staticmethod
    def name(t: Txn | None) -> str:
        if t is None:
            return "the initial state"
        return f"T{t.id}" + (f" ({t.commit_id})" if t.commit_id else "")

    # -- indexing --

    def index_writes(self) -> None:
        self.list_keys: set[str] = set()
        self.register_keys: set[str] = set()
        self.appender: dict[tuple[str, Any], Txn] = {}
        self.appends_of: dict[tuple[int, str], list[Any]] = defaultdict(list)
        self.value_writer: dict[tuple[str, Any], Any] = {}
        self.by_commit: dict[str, Txn] = {}
        for t in self.txns:
            if t.commit_id:
                self.by_commit.setdefault(t.commit_id, t)
            for f, k, arg, _ in t.ops:
                if f == APPEND:
                    self.list_keys.add(k)
                    e = _canon(arg)
                    other = self.appender.get((k, e))
                    if other is not None and other is not t:
                        raise HistoryError(
                            f"element {arg!r} is appended to {k!r} by transactions {other.id} and {t.id}: "
                            "list-append elements must be unique"
                        )
                    self.appender[(k, e)] = t
                    self.appends_of[(t.id, k)].append(e)
                elif f == WRITE:
                    self.register_keys.add(k)
                    v = _canon(arg)
                    prev = self.value_writer.get((k, v))
                    self.value_writer[(k, v)] = t if prev is None or prev is t else _AMBIGUOUS
        both = self.list_keys & self.register_keys
        if both:
            raise HistoryError(f"keys used both as lists and as registers: {sorted(both)[:5]}")

    def external_reads(self, t: Txn) -> list[tuple[str, Any, int | None]]:
        """The reads of ``t`` that saw other transactions' state (not after its own write of the key)."""
        written: set[str] = set()
        out = []
        for f, k, value, version in t.ops:
            if f == READ:
                if k not in written:
                    out.append((k, value, version))
            else:
                written.add(k)
        return out

    def collect_observations(self) -> None:
        self.obs: dict[str, list[_Obs]] = defaultdict(list)

        def add(k: str, version: int | None, value: Any, reader: Txn | None, source: str) -> None:
            elems = [_canon(e) for e in _as_list(value)] if k in self.list_keys else []
            self.obs[k].append(_Obs(k, version, value, reader, source, elems))

        for t in self.txns:
            if t.outcome != "ok":
                continue
            for k, value, version in self.external_reads(t):
                add(k, version, value, t, f"read by T{t.id}")
        if self.final is not None:
            for k, (value, version) in self.final.state.items():
                add(k, version, value, None, "final state")
            for k, entries in self.final.history.items():
                for version, _cid, value in entries:
                    add(k, version, value, None, "final history")

    def writer_of_value(self, k: str, value: Any) -> Txn | None:
        """The transaction that wrote the version holding ``value`` (list: its last element)."""
        if k in self.list_keys:
            lst = _as_list(value)
            return self.appender.get((k, _canon(lst[-1]))) if lst else None
        w = self.value_writer.get((k, _canon(value)))
        return w if isinstance(w, Txn) else None

    def decide_committed(self) -> None:
        evidence: set[int] = set()
        for k, observations in self.obs.items():
            for o in observations:
                if k in self.list_keys:
                    for e in o.elems:
                        w = self.appender.get((k, e))
                        if w is not None:
                            evidence.add(w.id)
                elif o.value is not None:
                    w = self.value_writer.get((k, _canon(o.value)))
                    if isinstance(w, Txn):
                        evidence.add(w.id)
        if self.final is not None:
            for entries in self.final.history.values():
                for _v, cid, _val in entries:
                    t = self.by_commit.get(cid) if cid else None
                    if t is not None:
                        evidence.add(t.id)
        self.committed: dict[int, Txn] = {}
        for t in self.txns:
            if t.outcome == "ok" or (t.outcome == "info" and t.id in evidence):
                self.committed[t.id] = t
        self.info_committed = sum(1 for t in self.committed.values() if t.outcome == "info")

    # -- checks --

    def check_reads(self) -> None:
        """G1a, G1b, garbage reads, duplicated elements: every observed value, against its writers."""
        for k, observations in self.obs.items():
            reported_g1a: set[tuple[int, str]] = set()
            garbage: set[Any] = set()
            dup_reported = False
            for o in observations:
                where = o.source
                readers = [o.reader] if o.reader else []
                if k in self.list_keys:
                    canon = o.elems
                    if not dup_reported and len(set(canon)) != len(canon):
                        twice = [e for e, n in Counter(canon).items() if n > 1]
                        writers = [self.appender[(k, e)] for e in twice if (k, e) in self.appender]
                        self.report("duplicate-commit",
                                    f"{k}: the list {where} holds {', '.join(map(repr, twice[:5]))} more than once "
                                    "(an append applied twice)", [*readers, *writers])
                        dup_reported = True
                    for e in canon:
                        w = self.appender.get((k, e))
                        if w is None:
                            if e not in garbage:  # once per element: every later list holds it too
                                garbage.add(e)
                                self.report("garbage-read",
                                            f"{k}: the list {where} holds {e!r}, which no transaction appended", readers)
                        elif w.outcome == "fail" and (w.id, where) not in reported_g1a:
                            reported_g1a.add((w.id, where))
                            self.report("G1a", f"{k}: the list {where} holds element {e!r} of {self.name(w)}, "
                                        f"which failed ({w.error})", [*readers, w])
                    if canon:
                        w = self.appender.get((k, canon[-1]))
                        mine = self.appends_of.get((w.id, k), []) if w is not None else []
                        if w is not None and o.reader is not w and mine and mine[-1] != canon[-1]:
                            self.report("G1b", f"{k}: the list {where} ends with {canon[-1]!r}, in the middle of "
                                        f"{self.name(w)}'s appends {mine}", [*readers, w])
                elif o.value is not None:
                    w = self.value_writer.get((k, _canon(o.value)))
                    if w is None and o.version:
                        self.report("garbage-read", f"{k}: {where} saw version {o.version} = {o.value!r}, "
                                    "which no transaction wrote", readers)
                    elif isinstance(w, Txn) and w.outcome == "fail":
                        self.report("G1a", f"{k}: {where} saw {o.value!r} written by {self.name(w)}, "
                                    f"which failed ({w.error})", [*readers, w])
        if self.final is not None:
            for k, entries in self.final.history.items():
                for version, cid, _ in entries:
                    t = self.by_commit.get(cid) if cid else None
                    if t is not None and t.outcome == "fail":
                        self.report("G1a", f"{k}: the final history holds version {version} by commit {cid} of "
                                    f"{self.name(t)}, which failed ({t.error})", [t])

    def check_results(self) -> None:
        """incomplete-result: an acknowledged commit names the new version of some of its writes,
        not of every one. A server that reports versions reports them all (PROTOCOL.md §5.5,
        §5.7); a history whose client reports none (all null) keeps the old meaning of null."""
        for t in self.txns:
            if t.outcome != "ok":
                continue
            reported = sorted({op[1] for op in t.writes() if op[3] is not None})
            missing = sorted({op[1] for op in t.writes() if op[3] is None} - set(reported))
            if reported and missing:
                self.report("incomplete-result",
                            f"{self.name(t)} was acknowledged with the new version of {reported} "
                            f"but not of {missing}, which it also wrote", [t])

    def version_claims(self) -> None:
        """Who wrote each version of each key; two claimants (or two values) of one version is a conflict."""
        claims: dict[str, dict[int, dict[int, str]]] = defaultdict(lambda: defaultdict(dict))
        for t in self.committed.values():
            for _f, k, _arg, version in t.writes():
                if version is not None:
                    claims[k][version].setdefault(t.id, "its ok")
        if self.final is not None:
            for k, entries in self.final.history.items():
                for version, cid, _ in entries:
                    writer = self.by_commit.get(cid) if cid else None
                    if writer is not None and writer.id in self.committed:
                        claims[k][version].setdefault(writer.id, "the final history")
        values: dict[tuple[str, int], dict[Any, str]] = defaultdict(dict)
        for k, observations in self.obs.items():
            for o in observations:
                if o.version is None:
                    continue
                values[(k, o.version)].setdefault(_canon(o.value), o.source)
                if o.version > 0:
                    w = self.writer_of_value(k, o.value)
                    if w is not None and w.id in self.committed:
                        claims[k][o.version].setdefault(w.id, f"the value {o.source}")
        for (k, version), vals in sorted(values.items()):
            if len(vals) > 1:
                shown = "; ".join(f"{v} ({src})" for v, src in list(vals.items())[:3])
                readers = [o.reader for o in self.obs[k] if o.version == version and o.reader]
                self.report("version-conflict", f"{k}: version {version} was seen with different values: {shown}",
                            readers)
        self.writer_at: dict[str, dict[int, Txn]] = {}
        for k, per_version in claims.items():
            known: dict[int, Txn] = {}
            for version, who in sorted(per_version.items()):
                if len(who) > 1:
                    parts = ", ".join(f"{self.name(self.by_id[i])} per {src}" for i, src in who.items())
                    self.report("version-conflict", f"{k}: version {version} is claimed by {parts}",
                                [self.by_id[i] for i in who])
                else:
                    (tid,) = who
                    known[version] = self.by_id[tid]
            self.writer_at[k] = known

    def list_orders(self) -> None:
        """Incompatible orders, by list prefixes (longest list, and higher versions)."""
        self.longest: dict[str, list[Any]] = {}
        for k in self.list_keys:
            observations = self.obs.get(k, [])
            lists = [(o, o.elems) for o in observations]
            longest = max((lst for _, lst in lists), key=len, default=[])
            self.longest[k] = longest
            bad = [(o, lst) for o, lst in lists if lst != longest[: len(lst)]]
            if bad:
                o, lst = bad[0]
                self.report(
                    "incompatible-order",
                    f"{k}: {len(bad)} observed list(s) are not a prefix of the longest list "
                    f"(length {len(longest)}); e.g. {o.source} at version {o.version}: {lst[-6:]} vs the longest "
                    f"{longest[max(0, len(lst) - 6):len(lst)]}",
                    [b.reader for b, _ in bad if b.reader][:10],
                )
            by_version: dict[int, tuple[_Obs, list[Any]]] = {}
            for o, lst in lists:
                if o.version is not None:
                    by_version.setdefault(o.version, (o, lst))
            versions = sorted(by_version)
            for lo, hi in zip(versions, versions[1:], strict=False):
                (o1, l1), (o2, l2) = by_version[lo], by_version[hi]
                if len(l1) >= len(l2) or l2[: len(l1)] != l1:
                    self.report(
                        "incompatible-order",
                        f"{k}: the list at version {lo} ({o1.source}, length {len(l1)}) is not a proper prefix of "
                        f"the list at version {hi} ({o2.source}, length {len(l2)})",
                        [o.reader for o in (o1, o2) if o.reader],
                    )
                    break

    def build_graph(self) -> None:
        g = self.graph
        for tid in self.committed:
            g.add_node(tid)
        # server version order
        for k, known in self.writer_at.items():
            versions = sorted(known)
            for a, b in zip(versions, versions[1:], strict=False):
                g.add(known[a].id, known[b].id, WW, k, f"{k}: v{a} -> v{b}")
        ordered = {k: sorted(known) for k, known in self.writer_at.items()}
        for r in self.committed.values():
            for k, _value, version in self.external_reads(r) if r.outcome == "ok" else ():
                if version is None or k not in ordered:
                    continue
                known, versions = self.writer_at[k], ordered[k]
                w = known.get(version)
                if w is not None:
                    g.add(w.id, r.id, WR, k, f"{k}: read v{version}")
                i = bisect.bisect_right(versions, version)
                if i < len(versions):
                    nxt = versions[i]
                    g.add(r.id, known[nxt].id, RW, k, f"{k}: read v{version}, overwritten by v{nxt}")
        # list order, independently of the version numbers
        for k in self.list_keys:
            self._list_edges(k)
        self._realtime_edges()

    def _list_edges(self, k: str) -> None:
        g = self.graph
        longest = self.longest.get(k, [])
        writers = [self.appender.get((k, e)) for e in longest]
        committed = [w if w is not None and w.id in self.committed else None for w in writers]
        prev: Txn | None = None
        for i, w in enumerate(committed):
            if w is None:
                continue
            if prev is not None and prev is not w:
                g.add(prev.id, w.id, WW, k, f"{k}: element {longest[i - 1]!r} before {longest[i]!r}")
            prev = w
        # next committed writer at or after each position
        next_writer: list[Txn | None] = [None] * (len(longest) + 1)
        for i in range(len(longest) - 1, -1, -1):
            next_writer[i] = committed[i] or next_writer[i + 1]
        seen = {e for o in self.obs.get(k, []) for e in o.elems}
        unseen = [
            (t, e) for t in self.committed.values() for e in self.appends_of.get((t.id, k), []) if e not in seen
        ]
        for o in self.obs.get(k, []):
            r, lst = o.reader, o.elems
            if r is None:
                continue
            if lst != longest[: len(lst)]:
                continue  # reported as incompatible-order; nothing to infer from it
            if lst:
                w = self.appender.get((k, lst[-1]))
                if w is not None and w.id in self.committed:
                    g.add(w.id, r.id, WR, k, f"{k}: read a list ending in {lst[-1]!r}")
            nxt = next_writer[len(lst)]
            if nxt is not None:
                g.add(r.id, nxt.id, RW, k, f"{k}: read {len(lst)} elements, then {longest[len(lst)]!r}... appended")
            for t, e in unseen:
                g.add(r.id, t.id, RW, k, f"{k}: read without {e!r}, an acknowledged append no list ever held")

    def _realtime_edges(self) -> None:
        """T -> U when T completed before U was invoked (transitively reduced, as Elle does)."""
        events: list[tuple[int, int, Txn]] = []
        for t in self.committed.values():
            events.append((t.invoke_index, 0, t))
            if t.complete_index is not None:
                events.append((t.complete_index, 1, t))
        events.sort(key=lambda e: (e[0], e[1]))
        frontier: set[int] = set()
        preds: dict[int, frozenset[int]] = {}
        for _, kind, t in events:
            if kind == 0:
                preds[t.id] = frozenset(frontier)
                for p in frontier:
                    self.graph.add(p, t.id, RT, None, f"T{p} completed before T{t.id} began")
            else:
                frontier -= preds.get(t.id, frozenset())
                frontier.add(t.id)

    def check_cycles(self) -> None:
        for cycle in self.graph.find_cycles():
            txns = [self.by_id[n] for n in cycle.nodes]
            path = " ".join(
                f"T{a} -{e.kind}{f'({e.key})' if e.key else ''}->" for a, _b, e in cycle.steps
            ) + f" T{cycle.nodes[0]}"
            self.report(
                cycle.kind,
                f"{cycle.kind} cycle of {len(cycle.nodes)} transactions (strongly connected component of "
                f"{cycle.component_size}): {path}",
                txns,
                cycle.describe_steps(),
            )

    def check_fractured(self) -> None:
        """A committed reader saw T's write on one key and a version before T's write on another."""
        # for each pair of keys, the committed transactions that wrote both
        both: dict[tuple[str, str], list[tuple[Txn, dict[str, tuple[list[Any], int | None]]]]] = defaultdict(list)
        for t in self.committed.values():
            per_key: dict[str, tuple[list[Any], int | None]] = {}
            for f, k, arg, version in t.writes():
                elems, v = per_key.get(k, ([], None))
                if f == APPEND:
                    elems = [*elems, _canon(arg)]
                per_key[k] = (elems, version if version is not None else v)
            for k1 in per_key:
                for k2 in per_key:
                    if k1 != k2:
                        both[(k1, k2)].append((t, per_key))
        if not both:
            return
        reads_of: dict[int, dict[str, _Obs]] = defaultdict(dict)
        for observations in self.obs.values():
            for o in observations:
                if o.reader is not None:
                    reads_of[o.reader.id].setdefault(o.key, o)
        for rid, reads in reads_of.items():
            r = self.by_id[rid]
            sets = {k: set(o.elems) for k, o in reads.items() if k in self.list_keys}
            done: set[int] = set()
            for k1, o1 in reads.items():
                for k2, o2 in reads.items():
                    for t, per_key in both.get((k1, k2), ()):
                        if t.id in done or t.id == rid:
                            continue
                        if self._saw(k1, o1, sets.get(k1), per_key[k1], t, partly=True) is not True:
                            continue
                        if self._saw(k2, o2, sets.get(k2), per_key[k2], t, partly=False) is not False:
                            continue
                        if k2 in self.list_keys:
                            missed = [e for e in per_key[k2][0] if e not in sets[k2]]
                            what = f"a list without {missed[0]!r}"
                        else:
                            what = f"version {o2.version} (T{t.id} wrote v{per_key[k2][1]})"
                        done.add(t.id)
                        self.report(
                            "fractured-read",
                            f"T{rid} saw {self.name(t)}'s write of {k1} but {what} of {k2}: "
                            "only part of a multi-key commit",
                            [r, t],
                        )

    def _saw(self, k: str, o: _Obs, have: set[Any] | None, written: tuple[list[Any], int | None], t: Txn,
             partly: bool) -> bool | None:
        """Does observation ``o`` of ``k`` include t's write? None when it cannot be told.

        For lists, ``partly`` asks whether any of t's elements is there (the
        reader saw t at all), otherwise whether all of them are.
        """
        elems, version = written
        if have is not None:
            hits = [e in have for e in elems]
            return any(hits) if partly else all(hits)
        if version is not None and o.version is not None:
            return o.version >= version
        if o.value is not None and self.value_writer.get((k, _canon(o.value))) is t:
            return True
        return None

    def check_final(self) -> None:
        final = self.final
        if final is None:
            self.notes.append("no final event: durability and idempotency of the final state not checked")
            return
        # version order of the kept history, and the state against it
        kept_from: dict[str, int] = {}
        for k, entries in final.history.items():
            versions = [v for v, _, _ in entries]
            if versions:
                kept_from[k] = versions[0]
            for a, b in zip(versions, versions[1:], strict=False):
                if b != a + 1:
                    self.report("version-gap", f"{k}: the final history goes from version {a} to {b}")
            state = final.state.get(k)
            if state is not None and versions and versions[-1] != state[1]:
                self.report("version-gap", f"{k}: the final history ends at version {versions[-1]} "
                            f"but the final state is at version {state[1]}")
            cids = [c for _, c, _ in entries if c]
            for cid, n in Counter(cids).items():
                if n > 1:
                    t = self.by_commit.get(cid)
                    self.report("duplicate-commit", f"{k}: commit {cid} appears {n} times in the final history",
                                [t] if t else [])
        # no client saw a version above the final one
        written: dict[str, list[tuple[Txn, int]]] = defaultdict(list)  # key -> (txn, version it wrote)
        for t in self.committed.values():
            for _, k, _, v in t.writes():
                if v is not None:
                    written[k].append((t, v))
        for k, observations in self.obs.items():
            state = final.state.get(k)
            if state is None:
                continue
            above = [o for o in observations if o.version is not None and o.version > state[1]]
            writes_above = [(t, v) for t, v in written.get(k, ()) if v > state[1]]
            if above or writes_above:
                top = max([o.version for o in above if o.version is not None] + [v for _, v in writes_above])
                self.report("version-gap", f"{k}: version {top} was observed but the final version is {state[1]}",
                            [o.reader for o in above if o.reader][:5] + [t for t, _ in writes_above][:5])
        # every committed write is in the final state
        lost: dict[str, list[Txn]] = defaultdict(list)
        final_elements = {k: {_canon(e) for e in _as_list(v)} for k, (v, _) in final.state.items()}
        commit_at = {k: {v: c for v, c, _ in es} for k, es in final.history.items()}  # key -> version -> id
        commits_in = {k: set(m.values()) for k, m in commit_at.items()}
        for t in self.committed.values():
            for f, k, arg, version in t.writes():
                state = final.state.get(k)
                if f == APPEND:
                    if state is None:
                        self.unverifiable += 1
                    elif _canon(arg) not in final_elements[k]:
                        lost[k].append(t)
                    continue
                kept = commit_at.get(k, {})
                if version is None:
                    if t.commit_id and t.commit_id in commits_in.get(k, ()):
                        continue
                    self.unverifiable += 1
                elif version in kept:
                    if t.commit_id is not None and kept[version] is not None and kept[version] != t.commit_id:
                        lost[k].append(t)
                elif state is not None and version > state[1]:
                    lost[k].append(t)
                else:
                    self.unverifiable += 1  # older than the kept history
        for k, ts in sorted(lost.items()):
            for t in ts:
                self.report("lost-write", f"{k}: {self.name(t)} ({t.outcome}) wrote "
                            f"{[op[2] for op in t.writes() if op[1] == k]} but the final state does not hold it", [t])
        if self.unverifiable:
            self.notes.append(
                f"{self.unverifiable} committed writes could not be checked for durability "
                "(older than the kept history, or keys missing from the final state)"
            )

    def run(self) -> Report:
        self.index_writes()
        self.collect_observations()
        self.decide_committed()
        self.check_reads()
        self.check_results()
        self.version_claims()
        self.list_orders()
        self.build_graph()
        self.check_cycles()
        self.check_fractured()
        self.check_final()
        keys = {k for t in self.txns for _, k, _, _ in t.ops}
        counts = {
            "transactions": len(self.txns),
            "ok": sum(1 for t in self.txns if t.outcome == "ok"),
            "fail": sum(1 for t in self.txns if t.outcome == "fail"),
            "info": sum(1 for t in self.txns if t.outcome == "info"),
            "info_committed": self.info_committed,
            "committed": len(self.committed),
            "keys": len(keys),
            "reads": sum(1 for t in self.committed.values() for op in t.ops if op[0] == READ),
            "writes": sum(1 for t in self.committed.values() for op in t.ops if op[0] != READ),
            "edges": self.graph.edge_count(),
            "unverifiable_writes": self.unverifiable,
        }
        # most telling first: cycles, then atomicity, durability, idempotency, version order, results
        order = {c: i for i, c in enumerate(dict.fromkeys(CATEGORIES.values()))}
        anomalies = sorted(self.anomalies, key=lambda a: order.get(a.category, len(order)))
        return Report(anomalies, counts, self.notes)

