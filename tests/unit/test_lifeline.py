"""``oribus.lifeline``: a child given the lifeline stops once the parent's end of it closes."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from oribus.lifeline import ParentLifeline

CHILD = (
    "import sys, time\n"
    "from oribus.lifeline import die_with_parent\n"
    "die_with_parent(int(sys.argv[1]))\n"
    "print('watching', flush=True)\n"
    "time.sleep(60)\n"
)


def test_a_child_stops_when_the_lifeline_closes():
    # The parent (this test) lives on: only the pipe can tell the child to stop.
    lifeline = ParentLifeline()
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(lifeline.child_fd)],
                             pass_fds=(lifeline.child_fd,), stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "watching"
        time.sleep(0.2)
        assert child.poll() is None, "the child stopped while its parent's lifeline was open"
        lifeline.close()
        assert child.wait(5) == -signal.SIGTERM
    finally:
        lifeline.close()
        if child.poll() is None:
            child.kill()
            child.wait(10)
