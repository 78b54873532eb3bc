"""CPU time from /proc: what a run cost, per operation, for the client and the servers.

Throughput on a shared machine moves with whatever else runs; the CPU seconds a run's own
processes spend per committed operation hardly do. So every run also reports:

- the client's CPU (this process: the workers, and the embedded engine when it runs here);
- the servers' CPU: every process of the server's session (each server is started in a
  session of its own, ``ServerProcess``/``start_new_session``), children included —
  PostgreSQL's backends, ``oribus up --processes``'s shard processes;
- the CPU everything else on the machine used meanwhile, from ``/proc/stat``: a run taken
  while other work ran shows it there;
- the minor page faults of the client and the servers: memory a run grows into (a store that
  keeps history, a log in the page cache) costs a fault per 4 KiB page, whose price depends
  on the machine (``machine.first_touch``: on a virtual machine whose host backs memory
  only when the guest first uses it, several times the price of a page the guest used
  before).
"""

from __future__ import annotations

import os
import resource
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: str) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # gone meanwhile
        return None
    # the command name is in parentheses and may hold spaces: split after its last ')'
    return raw[raw.rindex(")") + 2:].split()


def process_cpu_seconds(pid: int | str = "self") -> float:
    """User + system CPU seconds of one process so far, every thread (0 once it is gone)."""
    f = _stat_fields(str(pid))
    return 0.0 if f is None else (int(f[11]) + int(f[12])) / TICK


def process_memory(pid: int | str = "self") -> dict[str, int]:
    """VmRSS, RssAnon and RssFile of one process, in bytes (``/proc/PID/status``)."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "RssAnon", "RssFile"):
            out[name] = int(rest.split()[0]) * 1024
    return out


# fields of /proc/PID/stat after "pid (comm) ": state(0) ppid pgrp session(3) tty_nr tpgid flags
# minflt(7) cminflt(8) majflt cmajflt utime(11) stime(12) cutime(13) cstime(14)
SESSION = 3
CPU_TICKS = (11, 12, 13, 14)  # user + system, with the children waited for
MINOR_FAULTS = (7, 8)  # with the children waited for


def _session_sums(session_ids: set[int], fields: tuple[int, ...]) -> dict[int, int]:
    """pid -> the sum of ``fields`` of /proc/PID/stat, for every live process in one of
    ``session_ids``."""
    sums = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        f = _stat_fields(pid)
        if f is None or int(f[SESSION]) not in session_ids:
            continue
        sums[int(pid)] = sum(int(f[i]) for i in fields)
    return sums


def session_cpu_ticks(session_ids: set[int]) -> dict[int, int]:
    """pid -> user + system CPU ticks (with the children it has waited for) of every live
    process in one of ``session_ids``."""
    return _session_sums(session_ids, CPU_TICKS)


def session_cpu_seconds(session_ids: set[int]) -> float:
    return sum(session_cpu_ticks(session_ids).values()) / TICK


def session_minor_faults(session_ids: set[int]) -> dict[int, int]:
    """pid -> minor page faults (with the children it has waited for) of every live process
    in one of ``session_ids``."""
    return _session_sums(session_ids, MINOR_FAULTS)


def own_minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent not idle since boot (``/proc/stat``)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    values = [int(v) for v in fields]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    # guest time is already counted in user/nice
    return (sum(values[:8]) - idle) / TICK


class CpuMeter:
    """CPU used between ``start()`` and ``stop()`` by this process, by the server sessions
    and by everything else; and the minor page faults of this process and the servers."""

    def __init__(self, server_sessions: set[int]) -> None:
        self.sessions = server_sessions
        self.client = self.server = self.other = 0.0
        self.client_faults = self.server_faults = 0

    def start(self) -> None:
        self._own = own_cpu_seconds()
        self._servers = session_cpu_ticks(self.sessions) if self.sessions else {}
        self._own_faults = own_minor_faults()
        self._server_faults = session_minor_faults(self.sessions) if self.sessions else {}
        self._busy = machine_busy_seconds()

    def stop(self) -> None:
        self.client = own_cpu_seconds() - self._own
        # per process: one that ended meanwhile is not counted (its time since start() is
        # lost, an undercount), one that started meanwhile counts whole
        now = session_cpu_ticks(self.sessions) if self.sessions else {}
        self.server = sum(t - self._servers.get(pid, 0) for pid, t in now.items()) / TICK
        self.other = max(0.0, machine_busy_seconds() - self._busy - self.client - self.server)
        self.client_faults = own_minor_faults() - self._own_faults
        faults = session_minor_faults(self.sessions) if self.sessions else {}
        self.server_faults = sum(n - self._server_faults.get(pid, 0) for pid, n in faults.items())
