"""The audit: what every run proves about the backend it measured.

Every value holds a counter; a step writes ``counter + 1`` to each key it
writes, computed from the value it read. So the ``n``-th commit that writes
key ``k`` writes counter ``n``: the counter is the key's version, and the
history the clients saw pins down who read and wrote which version.

The clients record every acknowledged commit (when it was sent, when it was
acknowledged, the counter seen per key read, the counter written per key
written), and per key how many commits ended with an unknown outcome (an
error, not an answer). At the end the backend's own state is read
(``Backend.read_counters``) and checked:

1. **No lost update, nothing refused applied**: per key, acknowledged
   commits ``a``, unknown ``u``, final counter ``c``: ``a <= c <= a + u``.
   ``c < a`` means acknowledged commits were lost or overwrote one another.
2. **One version, one writer**: no two acknowledged commits wrote the same
   counter of a key (both were based on the same read: a lost update even if
   a later unknown commit hid it in the count).
3. **No accepted stale commit**: a commit T read ``k`` at counter ``n``; if
   the commit that wrote ``n + 1`` was acknowledged before T was even sent,
   ``k`` had changed before T's commit point and T must have been refused.
4. **Serializable**: the dependency graph of acknowledged commits (T reads
   the version W wrote: W -> T; T read the version W replaced: T -> W) has
   no cycle. This catches stale commits whose commit windows overlapped in
   time (write skew: two steps each read both keys and each wrote one).
5. **Read-only steps** saw counter 0 everywhere (nothing writes in that
   workload) and the store still holds 0 everywhere.

A backend that loses updates or accepts stale commits fails 1-4 (the
harness's test drives a Redis client without WATCH and an oribus client
writing blind through it). What no black-box audit can see is a stale
commit that overlapped in time with the overwrite and still fits a serial
order; the backends' documented mechanisms cover that case.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from peers.base import Outcome

MAX_PROBLEMS = 12  # examples kept per audit


@dataclass(slots=True)
class Commit:
    sent: float
    acked: float
    reads: tuple[tuple[int, int], ...]  # (key index, counter seen)
    writes: tuple[tuple[int, int], ...]  # (key index, counter written)


class History:
    """What the clients were told during one run."""

    def __init__(self, keys: Sequence[str]) -> None:
        self.keys = keys
        self.index = {k: i for i, k in enumerate(keys)}
        self.commits: list[Commit] = []
        self.unknown = [0] * len(keys)  # commits with an unknown outcome, per written key
        self.reads_checked = 0
        self.read_mismatch_count = 0  # read-only workload: values read that were not 0
        self.read_mismatches: list[str] = []  # the first of them

    def committed(self, out: Outcome, acked: float) -> None:
        index = self.index
        self.commits.append(Commit(out.sent, acked,
                                   tuple((index[k], n) for k, n in out.seen.items()),
                                   tuple((index[k], n) for k, n in out.written.items())))

    def outcome_unknown(self, write_keys: Sequence[str]) -> None:
        for k in write_keys:
            self.unknown[self.index[k]] += 1

    def read_only(self, got: dict[str, int], expected: int = 0) -> None:
        self.reads_checked += 1
        for k, n in got.items():
            if n != expected:
                self.read_mismatch_count += 1
                if len(self.read_mismatches) < MAX_PROBLEMS:
                    self.read_mismatches.append(f"{k}: read {n}, but nothing writes in this workload")


@dataclass
class AuditReport:
    ok: bool
    acknowledged: int  # commits acknowledged over the whole run (warm-up included)
    unknown: int  # commits whose outcome is unknown (errors)
    keys: int
    lost_updates: int = 0  # sum over keys of (acknowledged - final counter) where positive
    applied_unacknowledged: int = 0  # sum of (final - acknowledged - unknown) where positive
    duplicate_versions: int = 0  # versions written by more than one acknowledged commit
    stale_commits: int = 0  # acknowledged commits that read a version replaced before they were sent
    cycle_commits: int = 0  # acknowledged commits on or after a dependency cycle
    read_mismatches: int = 0
    reads_checked: int = 0  # read-only steps whose values were checked
    problems: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        if self.ok:
            checked = f"{self.reads_checked} reads" if self.reads_checked else f"{self.acknowledged} commits"
            return f"ok ({checked})"
        parts = [f"{name.replace('_', ' ')} {value}" for name, value in (
            ("lost_updates", self.lost_updates), ("applied_unacknowledged", self.applied_unacknowledged),
            ("duplicate_versions", self.duplicate_versions), ("stale_commits", self.stale_commits),
            ("cycle_commits", self.cycle_commits), ("read_mismatches", self.read_mismatches)) if value]
        return "FAIL: " + ", ".join(parts)


def audit(history: History, final: Sequence[int | None]) -> AuditReport:
    keys = history.keys
    commits = history.commits
    problems: list[str] = []

    def problem(text: str) -> None:
        if len(problems) < MAX_PROBLEMS:
            problems.append(text)

    def describe(t: int) -> str:
        c = commits[t]
        reads = ", ".join(f"{keys[k]}@{n}" for k, n in c.reads)
        writes = ", ".join(f"{keys[k]}={n}" for k, n in c.writes)
        return f"[read {reads}; wrote {writes}]"

    report = AuditReport(ok=True, acknowledged=len(commits), unknown=sum(history.unknown), keys=len(keys))

    # 1 + 2: counts per key and one writer per version
    acked = [0] * len(keys)
    writer: dict[tuple[int, int], int] = {}
    for t, c in enumerate(commits):
        for kv in c.writes:
            acked[kv[0]] += 1
            if kv in writer:
                report.duplicate_versions += 1
                problem(f"{keys[kv[0]]}: counter {kv[1]} written by two acknowledged commits "
                        f"{describe(writer[kv])} and {describe(t)}: one overwrote the other")
            else:
                writer[kv] = t
    for i, c in enumerate(final):
        a, u = acked[i], history.unknown[i]
        if c is None:
            report.lost_updates += a
            problem(f"{keys[i]}: missing from the store")
        elif c < a:
            report.lost_updates += a - c
            problem(f"{keys[i]}: counter {c}, but {a} commits writing it were acknowledged")
        elif c > a + u:
            report.applied_unacknowledged += c - a - u
            problem(f"{keys[i]}: counter {c}, but only {a} commits were acknowledged "
                    f"(+{u} of unknown outcome)")

    # 3 + 4: stale reads, and the dependency graph
    succ: list[list[int]] = [[] for _ in commits]
    indegree = [0] * len(commits)
    for t, c in enumerate(commits):
        for k, n in c.reads:
            prev = writer.get((k, n))
            if prev is not None and prev != t:
                succ[prev].append(t)
                indegree[t] += 1
            nxt = writer.get((k, n + 1))
            if nxt is not None and nxt != t:
                succ[t].append(nxt)
                indegree[nxt] += 1
                if commits[nxt].acked < c.sent:
                    report.stale_commits += 1
                    problem(f"stale commit accepted: {describe(t)} read {keys[k]}@{n}, but "
                            f"{describe(nxt)} had written {keys[k]}={n + 1} and been acknowledged "
                            f"{(c.sent - commits[nxt].acked) * 1e3:.2f} ms before it was sent")
    ready = [t for t in range(len(commits)) if indegree[t] == 0]
    done = 0
    while ready:
        t = ready.pop()
        done += 1
        for v in succ[t]:
            indegree[v] -= 1
            if indegree[v] == 0:
                ready.append(v)
    if done < len(commits):
        report.cycle_commits = len(commits) - done
        problem(f"not serializable: {report.cycle_commits} acknowledged commits are on or after a "
                f"dependency cycle, e.g. {' -> '.join(describe(t) for t in _one_cycle(succ, indegree))}")

    # 5: read-only steps
    report.read_mismatches = history.read_mismatch_count
    report.reads_checked = history.reads_checked
    for text in history.read_mismatches:
        problem(text)

    report.ok = not (report.lost_updates or report.applied_unacknowledged or report.duplicate_versions
                     or report.stale_commits or report.cycle_commits or report.read_mismatches)
    report.problems = problems
    return report


def _one_cycle(succ: list[list[int]], indegree: list[int], limit: int = 4) -> list[int]:
    """A cycle among the nodes Kahn's algorithm could not remove (each has a remaining predecessor)."""
    remaining = {t for t, d in enumerate(indegree) if d > 0}
    pred: dict[int, int] = {}
    for u in remaining:
        for v in succ[u]:
            if v in remaining:
                pred.setdefault(v, u)
    node = next(iter(remaining))
    seen: dict[int, int] = {}
    path: list[int] = []
    while node not in seen:
        seen[node] = len(path)
        path.append(node)
        node = pred[node]
    cycle = path[seen[node]:][::-1]
    return cycle[:limit]
