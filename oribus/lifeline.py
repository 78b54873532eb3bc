"""Child processes that die with their parent: ``oribus up --processes`` and its shards.

If the parent of the shard processes is killed (kill -9, OOM killer), its
children must not live on with their WALs open beside a restarted parent.
Two mechanisms, because neither covers every case alone:

* ``PR_SET_PDEATHSIG`` (Linux ``prctl``): the kernel sends the child SIGTERM
  when the parent dies. It fires on the death of the parent *thread* that
  forked the child, so children are spawned from the main thread; and it is
  set only once the child runs, so a parent that died before then is missed.
* the lifeline pipe, which works everywhere and closes both gaps: the parent
  keeps a pipe's write end (never inherited by anyone) and passes the read
  end to each child (``oribus shard --parent-fd N``). Nothing is ever
  written; when the parent is gone the kernel closes the write end and the
  child's blocking read returns end-of-file, at once if that already happened.

Either way the child gets SIGTERM, so it stops as on ``kill``: drains, flushes,
closes its WAL and lets its data directory's lock go. If that graceful stop
hangs, it kills itself after ``GRACE_SECONDS`` (a crash is safe: every
acknowledged commit is already on disk). Even a survivor that escaped both could
not corrupt anything: it holds its shard directory's lock, so a restarted parent's
new shard process is refused (``DataDirLocked``, ``oribus.datadir_lock``).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import sys
import threading
import time

log = logging.getLogger("oribus.lifeline")

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
GRACE_SECONDS = 20.0  # a child told to stop that is still alive after this kills itself


class ParentLifeline:
    """The parent's side: a pipe whose read end each child is given (``child_fd``).

    Keep it open for as long as the children should live; ``close()`` after they exited.
    """

    def __init__(self) -> None:
        # os.pipe() descriptors are non-inheritable: a child gets the read end only where
        # it is named in Popen(pass_fds=...), and no child ever gets the write end (one
        # that did would keep every sibling's pipe open past the parent's death).
        self.child_fd, self._write_fd = os.pipe()

    def close(self) -> None:
        """Close both ends (children still running read end-of-file and stop). Idempotent."""
        for fd in (self.child_fd, self._write_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.child_fd = self._write_fd = -1


def die_with_parent(parent_fd: int) -> None:
    """The child's side: SIGTERM to this process when the parent dies (see the module docstring)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:  # the pipe still covers it
            log.warning("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
    threading.Thread(target=_watch_parent, args=(parent_fd,), name="oribus-lifeline", daemon=True).start()


def _watch_parent(fd: int) -> None:
    while True:
        try:
            if not os.read(fd, 1):
                break
        except OSError:  # a bad descriptor: no lifeline to watch, so act as if the parent died
            break
    log.warning("the parent process is gone: stopping")
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(GRACE_SECONDS)
    os.kill(os.getpid(), signal.SIGKILL)
