"""``--nemesis local``: faults on processes of this machine, on a seeded schedule.

Targets are pids the user names (``--pids``), or the processes of a deployment
verify started itself (``--start-local``). One fault at a time, a random target
each time (``random.Random(seed)``):

- ``kill``: SIGKILL. A process verify started is started again after a pause;
  a process it was only given stays down unless something else (a supervisor,
  Kubernetes) restarts it, and is no longer a target once gone.
- ``pause``: SIGSTOP for a while, then SIGCONT: it keeps its sockets and state
  but answers nothing (a long GC pause, a stalled VM).

``heal()`` ends every fault: SIGCONT to every target still paused, and a
restart of any started process that is down.

``GroupNemesis``: with ``--start-local --replicas R``, the faults a replica group is built
to survive (specs/replication.md §1), aimed by role at the members of the local groups
(``oribus.verify.groups``), one at a time, each only once its group is healthy again (every
member a voter, a primary serving), so that no fault ever takes more than a minority:

- ``kill-primary-wipe``: SIGKILL of a primary, and its data directory deleted — a lost
  machine, disk included. ``oribus up`` starts the member again on an empty directory: it
  rejoins as a learner and catches up.
- ``pause-primary``: SIGSTOP of a primary for longer than its lease (TTL + 1.5 s), then
  SIGCONT: another member has taken over meanwhile; the old primary, fenced by its lost
  lease and the newer term, steps down.
- ``kill-follower``: SIGKILL of a follower; ``oribus up`` starts it again.

Each round hits the kinds in a seeded order, each once, on seeded groups. A group that is
not healthy again within ``settle`` seconds is recorded (``unhealthy``) and skipped. After a
primary's fault, ``takeover`` records when etcd named its successor (``takeovers``: the
failover times, which the summary gives as a median and a range).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import signal
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from oribus.verify.groups import GroupView, LocalGroups, MemberProcess

GROUP_FAULTS = ("kill-primary-wipe", "pause-primary", "kill-follower")


@dataclass
class Target:
    """One process to hit: its pid, and how to start it again (None: verify did not start it)."""

    name: str
    pid: int
    restart: Callable[[], Awaitable[int]] | None = None  # starts it again; returns the new pid

    def alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


@dataclass
class LocalNemesis:
    targets: list[Target]
    seed: int = 0
    interval: float = 2.0  # at most this many seconds between faults
    max_down: float = 2.0  # a target stays killed or paused at most this long
    events: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self._t0 = time.monotonic()
        self._paused: set[int] = set()

    def _log(self, fault: str, target: Target, detail: str = "") -> None:
        self.events.append({"at": round(time.monotonic() - self._t0, 3), "fault": fault,
                            "target": target.name, "pid": target.pid, "detail": detail})

    @property
    def faults(self) -> int:
        return sum(1 for e in self.events if e["fault"] in ("kill", "pause"))

    def _signal(self, target: Target, sig: signal.Signals) -> bool:
        try:
            os.kill(target.pid, sig)
        except ProcessLookupError:
            self._log("gone", target)
            return False
        return True

    async def kill(self, target: Target, down: float) -> None:
        if not self._signal(target, signal.SIGKILL):
            return
        self._log("kill", target)
        if target.restart is None:
            return
        await asyncio.sleep(down)
        target.pid = await target.restart()
        self._log("restart", target)

    async def pause(self, target: Target, down: float) -> None:
        if not self._signal(target, signal.SIGSTOP):
            return
        self._paused.add(target.pid)
        self._log("pause", target, f"{down:.2f}s")
        try:
            await asyncio.sleep(down)
        finally:
            self._signal(target, signal.SIGCONT)
            self._paused.discard(target.pid)
            self._log("resume", target)

    async def run(self, duration: float) -> None:
        """Faults for ``duration`` seconds (or until cancelled), one at a time."""
        deadline = time.monotonic() + duration
        while time.monotonic() < deadline:
            await asyncio.sleep(self.rng.uniform(0.3, self.interval))
            live = [t for t in self.targets if t.restart is not None or t.alive()]
            if not live or time.monotonic() >= deadline:
                continue
            target = self.rng.choice(live)
            down = self.rng.uniform(0.2, self.max_down)
            if self.rng.random() < 0.5:
                await self.kill(target, down)
            else:
                await self.pause(target, down)

    async def heal(self) -> None:
        for target in self.targets:
            with contextlib.suppress(ProcessLookupError):
                os.kill(target.pid, signal.SIGCONT)
            if target.restart is not None and not target.alive():
                target.pid = await target.restart()
                self._log("restart", target, "heal")
        self._log("healed", Target("*", 0))


@dataclass
class GroupNemesis:
    """Faults by role on the replica groups of a local ``oribus up`` (module docstring)."""

    groups: LocalGroups
    lease_ttl: float  # the members' etcd lease TTL: a pause longer than it deposes a primary
    seed: int = 0
    interval: float = 2.0  # at most this many seconds between a healed fault and the next
    settle: float = 60.0  # seconds a group has to be healthy again before it is hit
    events: list[dict[str, Any]] = field(default_factory=list)
    takeovers: list[float] = field(default_factory=list)  # seconds from a primary's fault to its successor

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self._t0 = time.monotonic()
        self._paused: set[int] = set()

    def _log(self, fault: str, target: str, pid: int = 0, detail: str = "") -> None:
        self.events.append({"at": round(time.monotonic() - self._t0, 3), "fault": fault,
                            "target": target, "pid": pid, "detail": detail})

    @property
    def faults(self) -> int:
        return sum(self.by_kind().values())

    def by_kind(self) -> dict[str, int]:
        counts = Counter(e["fault"] for e in self.events if e["fault"] in GROUP_FAULTS)
        return {kind: counts.get(kind, 0) for kind in GROUP_FAULTS}

    def describe(self) -> str:
        kinds = ", ".join(f"{n} {kind}" for kind, n in self.by_kind().items())
        line = f"{self.faults} faults ({kinds}) on {self.groups.shards} replica groups of {self.groups.replicas}"
        if self.takeovers:
            t = sorted(self.takeovers)
            line += (f"; a new primary {t[len(t) // 2]:.1f}s after a primary's fault (median; "
                     f"{t[0]:.1f}-{t[-1]:.1f}s over {len(t)})")
        return line

    async def kill_primary_wipe(self, view: GroupView) -> None:
        victim = view.primary_process()
        assert victim is not None
        if not _signal(victim.pid, signal.SIGKILL):
            return
        hit = time.monotonic()
        await _wait_gone(victim.pid)
        # before `oribus up` starts it again (it waits RESTART_DELAY), so it finds nothing
        shutil.rmtree(victim.data_dir, ignore_errors=True)
        self._log("kill-primary-wipe", victim.name, victim.pid, f"term {view.primary.term if view.primary else 0}; "
                  f"deleted {victim.data_dir}")
        await self._takeover(victim, hit)

    async def pause_primary(self, view: GroupView) -> None:
        victim = view.primary_process()
        assert victim is not None
        if not _signal(victim.pid, signal.SIGSTOP):
            return
        hit = time.monotonic()
        down = self.lease_ttl + 1.5
        self._paused.add(victim.pid)
        self._log("pause-primary", victim.name, victim.pid, f"{down:.1f}s (lease TTL {self.lease_ttl:g}s)")
        try:
            watching = asyncio.create_task(self._takeover(victim, hit, down))
            _, pending = await asyncio.wait({watching}, timeout=down)
            for task in pending:
                task.cancel()
            await asyncio.sleep(max(0.0, hit + down - time.monotonic()))
        finally:
            _signal(victim.pid, signal.SIGCONT)
            self._paused.discard(victim.pid)
            self._log("resume", victim.name, victim.pid)

    async def _takeover(self, victim: MemberProcess, hit: float, timeout: float | None = None) -> None:
        """Log ``takeover`` once etcd names another member primary of the victim's group, with
        the seconds since the fault (the failover time, bar the bus's next call)."""
        deadline = hit + (self.settle if timeout is None else timeout)
        while time.monotonic() < deadline:
            view = await self.groups.view(victim.shard)
            if view.primary is not None and view.primary.member != victim.member:
                self._log("takeover", f"shard {victim.shard} member {view.primary.member}", 0,
                          f"term {view.primary.term}, {time.monotonic() - hit:.2f}s after the fault")
                self.takeovers.append(time.monotonic() - hit)
                return
            await asyncio.sleep(0.1)

    async def kill_follower(self, view: GroupView) -> None:
        victim: MemberProcess = self.rng.choice(view.followers())
        if _signal(victim.pid, signal.SIGKILL):
            self._log("kill-follower", victim.name, victim.pid)

    async def run(self, duration: float) -> None:
        """Faults for ``duration`` seconds (or until cancelled), one at a time."""
        deadline = time.monotonic() + duration
        kinds: list[str] = []
        while time.monotonic() < deadline:
            await asyncio.sleep(self.rng.uniform(0.3, self.interval))
            if not kinds:
                kinds = list(GROUP_FAULTS)
                self.rng.shuffle(kinds)
            shard = self.rng.randrange(self.groups.shards)
            view = await self.groups.wait_healthy(shard, max(0.0, min(self.settle, deadline - time.monotonic())))
            if time.monotonic() >= deadline:
                break
            if view is None:
                self._log("unhealthy", f"shard {shard}", detail=(await self.groups.view(shard)).describe())
                continue
            kind = kinds.pop()
            await {"kill-primary-wipe": self.kill_primary_wipe, "pause-primary": self.pause_primary,
                   "kill-follower": self.kill_follower}[kind](view)

    async def heal(self) -> None:
        """SIGCONT to anything paused; then wait until every group is healthy again."""
        for pid in list(self._paused):
            _signal(pid, signal.SIGCONT)
        self._paused.clear()
        for shard in range(self.groups.shards):
            view = await self.groups.wait_healthy(shard, self.settle)
            if view is None:
                self._log("unhealthy", f"shard {shard}", detail=(await self.groups.view(shard)).describe())
        self._log("healed", "*")


def _signal(pid: int, sig: signal.Signals) -> bool:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return False
    return True


async def _wait_gone(pid: int, timeout: float = 5.0) -> None:
    """Until ``pid`` has exited (gone, or a zombie its parent has not reaped yet)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return
        if stat[stat.rindex(")") + 2:].startswith(("Z", "X")):
            return
        await asyncio.sleep(0.01)
