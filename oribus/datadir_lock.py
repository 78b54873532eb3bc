"""One process per data directory: an exclusive OS lock on ``<dir>/LOCK``.

Two processes writing one WAL interleave their LSNs; the next recovery then
finds a gap and ``oribus repair`` can only cut the log there, dropping
commits both had acknowledged. So every process that opens a data directory
(a shard, the bus's session journal, the embedded engine, ``oribus repair``)
first takes this lock, and holds it until it closes the directory or dies.

The lock is ``flock(LOCK_EX | LOCK_NB)`` on ``<dir>/LOCK``, opened with
O_CLOEXEC so that processes the holder starts do not inherit it. The file
holds the holder's pid (a decimal line), only so that the refusal can name
it; the lock itself is the flock, which the kernel drops when the holder's
last descriptor closes, on exit or on kill -9 alike. A LOCK file left behind
by a dead process is therefore simply free again. The file is never removed:
unlinking it would let two processes lock two different inodes of one name.

A second opener gets ``DataDirLocked`` at once (no waiting), naming the
directory and the holder's pid (specs/engine.md, "Data directory layout").
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from oribus.errors import DataDirLocked

LOCK_FILE = "LOCK"


class DataDirLock:
    """An exclusive lock on one data directory. ``DataDirLock.acquire(dir)``, then ``release()``.

    Usable as a context manager::

        with DataDirLock.acquire(data_dir):
            ...  # no other process has data_dir open
    """

    def __init__(self, directory: Path, fd: int) -> None:
        self.directory = directory
        self.path = directory / LOCK_FILE
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, directory: str | os.PathLike, *, create: bool = True) -> DataDirLock:
        """Lock ``directory`` (created if missing, unless ``create`` is false), or raise
        ``DataDirLocked`` naming the process that holds it."""
        directory = Path(directory)
        if create:
            directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            who = f"pid {holder}" if holder is not None else "a process that has not written its pid yet"
            raise DataDirLocked(
                f"{directory} is in use by another process ({who}); stop it first, or use another "
                "data directory",
                directory=str(directory), pid=holder,
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return cls(directory, fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Let the directory go (the next opener may take it). Idempotent."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)  # no stale pid for the next refusal to name
        os.close(fd)  # closing the last descriptor drops the flock

    def __enter__(self) -> DataDirLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"DataDirLock({str(self.directory)!r}, held={self.held})"


def _read_pid(fd: int) -> int | None:
    """The pid the holder wrote into the lock file (None: not written yet, or unreadable)."""
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
