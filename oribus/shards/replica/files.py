"""A member's data directory: every file operation ``ReplicaMember`` makes, in one place.

The layout is a shard's (``specs/engine.md``, "Data directory layout")::

    <data_dir>/LOCK  MANIFEST  wal/  snapshots/  [damaged-<ns>/]

``MemberFiles`` does it on the real filesystem, fsynced; the deterministic simulation
(``oribus.sim``) substitutes a twin on its simulated disk by setting
``ReplicaMember.files_class``, as it replaces the seams of ``Shard``. Nothing here decides
anything: the member says what to read, write, delete or move aside, and when.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from oribus.datadir_lock import DataDirLock
from oribus.shards.config import ShardConfig
from oribus.shards.manifest import MANIFEST_FILE, ShardManifest, read_manifest, write_manifest
from oribus.shards.wal import Wal, list_segments, load_latest_snapshot, write_snapshot
from oribus.shards.wal.segment import fsync_directory
from oribus.shards.wal.snapshot import latest_snapshot_file, latest_snapshot_lsn

log = logging.getLogger("oribus.replica")


class MemberFiles:
    """The files of one member's directory (module docstring)."""

    def __init__(self, config: ShardConfig) -> None:
        self.config = config
        self.fsync = not config.wal.unsafe_no_fsync

    def lock(self) -> DataDirLock:
        """One process per directory (``DataDirLocked`` otherwise)."""
        return DataDirLock.acquire(self.config.data_dir)

    def read_manifest(self) -> ShardManifest | None:
        """None: there is none; ``DataCorrupted``: it does not parse."""
        return read_manifest(self.config.data_dir)

    def write_manifest(self, manifest: ShardManifest, *, fsync: bool | None = None) -> None:
        """Atomic and (unless ``unsafe_no_fsync``) fsynced before it returns."""
        write_manifest(self.config.data_dir, manifest, fsync=self.fsync if fsync is None else fsync)

    def holds_no_data(self) -> bool:
        """No MANIFEST, no WAL segment, no snapshot: a new member, or one whose disk was lost."""
        cfg = self.config
        return (not (cfg.data_dir / MANIFEST_FILE).exists() and not list_segments(cfg.wal_dir)
                and latest_snapshot_lsn(cfg.snapshot_dir) is None)

    def load_snapshot(self) -> tuple[int, Any] | None:
        """``(lsn, raw)`` of the latest snapshot; ``DataCorrupted`` if it is damaged."""
        return load_latest_snapshot(self.config.snapshot_dir)

    def snapshot_file(self) -> tuple[int, bytes] | None:
        """``(lsn, the file's bytes)`` of the latest snapshot: what a primary sends a learner."""
        return latest_snapshot_file(self.config.snapshot_dir)

    def write_snapshot(self, lsn: int, raw: Any) -> None:
        """Atomic, durable on return; older snapshots are then deleted."""
        write_snapshot(self.config.snapshot_dir, lsn, raw)

    def open_wal(self, *, replay_from_lsn: int, on_record: Callable[[int, int, Any], None],
                 require_lsn: int) -> Wal:
        """The recovery scan (``Wal.open``), then the append side."""
        cfg = self.config
        return Wal.open(cfg.wal_dir, cfg.wal, replay_from_lsn=replay_from_lsn, on_record=on_record,
                        metrics_label=str(cfg.shard_id), require_lsn=require_lsn)

    def history_spill(self) -> Path:
        """Where a catch-up's history file is written as it arrives (beside the engine's)."""
        return self.config.history_dir / "data.mdb.incoming"

    def replace_history(self, incoming: Path | None) -> None:
        """Put a primary's history store copy (``incoming``, fsynced) in place of this
        member's (its environment closed), durably; None: delete this member's, so the
        snapshot's histories fill a new one."""
        directory = self.config.history_dir
        if incoming is not None:
            # (lmdb is loaded only when used)
            from oribus.shards.history.lmdb_engine import LmdbHistory

            LmdbHistory.install_file(directory, incoming, fsync=self.fsync)
            return
        removed = False
        for name in ("data.mdb", "lock.mdb"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(directory / name)
                removed = True
        if removed and self.fsync:
            fsync_directory(directory)

    def delete_log(self) -> None:
        """Delete every WAL segment (the WAL must be closed), durably."""
        wal_dir = self.config.wal_dir
        for segment in list_segments(wal_dir):
            os.unlink(segment.path)
        if wal_dir.is_dir() and self.fsync:
            fsync_directory(wal_dir)

    def move_aside(self) -> tuple[Path, list[str]]:
        """Move the MANIFEST, the WAL and the snapshots to ``damaged-<ns>/`` (kept for a
        post-mortem, out of the way of an empty log); returns where and what was moved."""
        cfg = self.config
        aside = cfg.data_dir / f"damaged-{time.time_ns()}"
        moved = []
        for name in (cfg.wal_dir.name, cfg.snapshot_dir.name, MANIFEST_FILE):
            path = cfg.data_dir / name
            if path.exists():
                aside.mkdir(parents=True, exist_ok=True)
                os.replace(path, aside / name)
                moved.append(name)
        if moved:
            fsync_directory(cfg.data_dir)
        return aside, moved
