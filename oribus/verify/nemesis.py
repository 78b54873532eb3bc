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
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any


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
