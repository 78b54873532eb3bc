"""A nemesis for real processes: kill -9 and restart, SIGSTOP / SIGCONT, on a seeded schedule.

Used by ``test_nemesis.py``: bounded runs in ``make test``, and as long as
``ORIBUS_NEMESIS_SECONDS`` asks in ``make soak``. The faults hit shard and bus processes of
an etcd-registered cluster while clients run; ``heal()`` ends every fault and
waits until every process serves again, so the final state can be read and
the recorded history checked.

Faults:

- ``kill``: SIGKILL, then a restart of the same command after a pause (a shard
  must wait for its old lease to run out, then claims its id with a new epoch;
  a bus restarts with an empty session table and follows etcd again);
- ``pause``: SIGSTOP for a while, then SIGCONT — the process keeps its sockets
  and state but answers nothing. A shard paused past its lease TTL may find its
  claim gone when it wakes: it is then fenced and exits (code 4), and the
  nemesis restarts it like a killed one.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field

from processes import ServerProcess


@dataclass
class Event:
    at: float  # seconds since the nemesis started
    fault: str
    target: str
    detail: str = ""


@dataclass
class Nemesis:
    targets: dict[str, ServerProcess]
    seed: int = 0
    kill_weight: float = 1.0
    pause_weight: float = 1.0
    max_down: float = 3.0  # seconds a target stays killed or paused
    events: list[Event] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self._t0 = time.monotonic()

    def _log(self, fault: str, target: str, detail: str = "") -> None:
        self.events.append(Event(round(time.monotonic() - self._t0, 3), fault, target, detail))

    @property
    def faults(self) -> int:
        return sum(1 for e in self.events if e.fault in ("kill", "pause"))

    async def kill(self, name: str, down: float) -> None:
        server = self.targets[name]
        await asyncio.to_thread(server.kill9)
        self._log("kill", name, f"down {down:.2f}s")
        await asyncio.sleep(down)
        server.start()
        self._log("restart", name)

    async def pause(self, name: str, down: float) -> None:
        server = self.targets[name]
        if not server.running:
            return
        server.pause()
        self._log("pause", name, f"{down:.2f}s")
        await asyncio.sleep(down)
        server.resume()
        self._log("resume", name)

    async def run(self, duration: float, interval: float = 1.0) -> None:
        """One fault at a time for ``duration`` seconds, a random target each time."""
        deadline = time.monotonic() + duration
        names = sorted(self.targets)
        while time.monotonic() < deadline:
            await asyncio.sleep(self.rng.uniform(0.2, interval))
            name = self.rng.choice(names)
            down = self.rng.uniform(0.2, self.max_down)
            if not self.targets[name].running:  # fenced by a lost claim: bring it back
                self.targets[name].start()
                self._log("restart", name, "it had exited")
                continue
            total = self.kill_weight + self.pause_weight
            if self.rng.random() * total < self.kill_weight:
                await self.kill(name, down)
            else:
                await self.pause(name, down)

    async def heal(self, timeout: float = 60.0, settle: float = 5.0) -> None:
        """End every fault: resume paused processes, restart exited ones, wait until all serve.

        A shard paused past its lease learns only after waking that its claim is gone, and
        exits (fenced) a moment later: so after everything serves, wait ``settle`` seconds
        (longer than a lease) and start over until no process has exited meanwhile.
        """
        for server in self.targets.values():
            server.resume()
        deadline = time.monotonic() + 4 * timeout
        while True:
            for name, server in self.targets.items():
                if not server.running:
                    server.start()
                    self._log("restart", name, "heal")
            for name, server in self.targets.items():
                try:
                    await asyncio.to_thread(server.wait_serving, timeout)
                except AssertionError:
                    # Fenced while starting: etcd answered too late for the fresh claim's lease
                    # (it stalls on a loaded disk), so the shard stopped (code 4), as it must.
                    # Restart it in the next round, as after a pause past the lease.
                    if server.running or time.monotonic() > deadline:
                        raise
                    self._log("fenced", name, "while starting")
            await asyncio.sleep(settle)
            if all(server.running for server in self.targets.values()):
                break
        self._log("healed", "*")


async def record_final_once_resolved(reader, recorder, keys: int, within: float = 60.0) -> None:
    """The final read of the list-append keys, retried while it is ``Unavailable``: a transaction
    whose coordinator was cut off mid-protocol keeps its keys locked until the bus's recovery
    sweep resolves it through its primary."""
    from oribus.checker.listappend import record_final
    from oribus.errors import Unavailable

    deadline = asyncio.get_running_loop().time() + within
    while True:
        try:
            await record_final(reader, recorder, keys=keys)
            return
        except Unavailable:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(1)
