"""The data directory lock (``oribus.datadir_lock``): one opener at a time, freed on release or death."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from oribus.datadir_lock import LOCK_FILE, DataDirLock
from oribus.errors import DataDirLocked

# A process that takes the lock, says so, and waits to be killed.
HOLDER = (
    "import sys, time\n"
    "from oribus.datadir_lock import DataDirLock\n"
    "lock = DataDirLock.acquire(sys.argv[1])\n"
    "print('held', flush=True)\n"
    "time.sleep(60)\n"
)


def test_acquire_creates_the_directory_and_writes_the_holder_pid(tmp_path):
    d = tmp_path / "a" / "b"
    with DataDirLock.acquire(d) as lock:
        assert lock.held
        assert (d / LOCK_FILE).read_text() == f"{os.getpid()}\n"
    assert not lock.held
    assert (d / LOCK_FILE).exists()  # never removed: a second inode would be a second lock


def test_a_second_opener_is_refused_naming_the_directory_and_the_holder(tmp_path):
    first = DataDirLock.acquire(tmp_path)
    try:
        with pytest.raises(DataDirLocked) as refused:
            DataDirLock.acquire(tmp_path)  # another open file: flock refuses it like another process
        assert str(tmp_path) in refused.value.message
        assert f"pid {os.getpid()}" in refused.value.message
        assert refused.value.details == {"directory": str(tmp_path), "pid": os.getpid()}
        assert not refused.value.retryable
    finally:
        first.release()
    DataDirLock.acquire(tmp_path).release()  # released: free again


def test_release_is_idempotent_and_clears_the_pid(tmp_path):
    lock = DataDirLock.acquire(tmp_path)
    lock.release()
    lock.release()
    assert (tmp_path / LOCK_FILE).read_text() == ""


def test_a_lock_file_left_by_a_dead_process_is_free(tmp_path):
    (tmp_path / LOCK_FILE).write_text("999999\n")  # a pid in the file is no lock: only the flock is
    with DataDirLock.acquire(tmp_path) as lock:
        assert lock.held


def test_the_lock_of_a_killed_holder_is_free_at_once(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(DataDirLocked, match=f"pid {holder.pid}"):
            DataDirLock.acquire(tmp_path)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
    with DataDirLock.acquire(tmp_path) as lock:
        assert lock.held


def test_children_of_the_holder_do_not_inherit_the_lock(tmp_path):
    lock = DataDirLock.acquire(tmp_path)
    child = subprocess.Popen(["sleep", "30"], close_fds=False)  # inherits every inheritable fd
    try:
        lock.release()
        # had the child inherited the descriptor, the flock would live on in it
        DataDirLock.acquire(tmp_path).release()
    finally:
        child.kill()
        child.wait(10)


def test_repair_style_open_does_not_create_a_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError):
        DataDirLock.acquire(tmp_path / "missing", create=False)
    assert not (tmp_path / "missing").exists()
