"""Failpoints: named no-op hooks at durability boundaries that tests can arm.

Code calls ``failpoint("wal.before_fsync")`` at the exact places where a crash
matters. Unarmed, the call is a dictionary lookup. Crash tests arm one point in
a child process, through the environment, so the process kills itself there::

    ORIBUS_FAILPOINTS="wal.before_fsync=kill@3"      # SIGKILL on the 3rd hit
    ORIBUS_FAILPOINTS="wal.after_append=raise"       # raise FailpointHit on the 1st hit
    ORIBUS_FAILPOINTS="a=kill@2,b=sleep:0.5"         # several points

Actions: ``kill`` (SIGKILL self: nothing is flushed, like a power cut for this
process), ``raise`` (FailpointHit), ``sleep:SECONDS``. ``@N`` fires on the Nth
hit (default 1); kill and raise then stay armed for every later hit.

Known points (grep ``failpoint(`` for the full list):
    wal.before_append, wal.after_append, wal.before_fsync, wal.after_fsync,
    snapshot.before_rename, snapshot.after_rename, manifest.before_rename,
    txn.after_prepare, txn.after_decide, txn.before_participant_commit,
    replica.before_truncate, replica.after_truncate, replica.install_snapshot,
    replica.before_voter, history.before_flush, history.before_commit, history.after_sync,
    history.compact, history.compact_commit
"""

from __future__ import annotations

import os
import signal
import threading
import time

ENV = "ORIBUS_FAILPOINTS"


class FailpointHit(RuntimeError):
    """Raised by a failpoint armed with the ``raise`` action."""


class _Armed:
    __slots__ = ("action", "arg", "after", "hits")

    def __init__(self, action: str, arg: float, after: int) -> None:
        self.action = action
        self.arg = arg
        self.after = after
        self.hits = 0


_armed: dict[str, _Armed] = {}
_lock = threading.Lock()
# Every failpoint name reached in this process (only recorded while any point
# is armed or tracing is on), so tests can enumerate reachable crash points.
_trace: dict[str, int] | None = None


def arm(name: str, action: str = "raise", after: int = 1) -> None:
    """Arm ``name``: ``action`` is "kill", "raise" or "sleep:SECONDS"."""
    arg = 0.0
    if action.startswith("sleep:"):
        arg = float(action.split(":", 1)[1])
        action = "sleep"
    if action not in ("kill", "raise", "sleep"):
        raise ValueError(f"unknown failpoint action {action!r}")
    with _lock:
        _armed[name] = _Armed(action, arg, max(1, after))


def disarm(name: str | None = None) -> None:
    """Disarm one point, or all of them."""
    with _lock:
        if name is None:
            _armed.clear()
        else:
            _armed.pop(name, None)


def trace(enable: bool = True) -> None:
    """Start (or stop) counting hits of every failpoint, armed or not."""
    global _trace
    _trace = {} if enable else None


def hits() -> dict[str, int]:
    """Hit counts since ``trace()`` was called."""
    return dict(_trace or {})


def failpoint(name: str) -> None:
    """A crash point. Does nothing unless ``name`` is armed."""
    if _trace is not None:
        _trace[name] = _trace.get(name, 0) + 1
    if not _armed:
        return
    fp = _armed.get(name)
    if fp is None:
        return
    with _lock:
        fp.hits += 1
        fire = fp.hits >= fp.after
    if not fire:
        return
    if fp.action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(10)  # SIGKILL is asynchronous for other threads; never go on
    elif fp.action == "raise":
        raise FailpointHit(name)
    elif fp.action == "sleep":
        time.sleep(fp.arg)


def arm_from_env(value: str | None = None) -> None:
    """Arm the points listed in ORIBUS_FAILPOINTS (see the module docstring)."""
    spec = os.environ.get(ENV, "") if value is None else value
    for item in filter(None, (p.strip() for p in spec.split(","))):
        name, _, rest = item.partition("=")
        action, _, after = (rest or "raise").partition("@")
        arm(name.strip(), action.strip(), int(after) if after else 1)


arm_from_env()
