"""The embedded engine: a bus and N shards in this process, no network hop.

``EmbeddedEngine.open(path, shards=N)`` recovers every shard from its snapshot
and WAL, resolves transactions left prepared by a coordinator that died (in
one process the coordinator died with the shards, so each is asked of its
primary, which aborts any that has no outcome), and runs two background
chores: expiring idle sessions and resolving prepared transactions whose
coordinator went silent.

Layout of the data directory::

    DATA/LOCK                 flock held by the process that has DATA open (oribus.datadir_lock)
    DATA/layout.json          {"format": 1, "shards": N, "slots": 4096}
    DATA/shard-0000/MANIFEST  the shard's id and durable high-water mark (oribus.shards.manifest)
    DATA/shard-0000/LOCK      the shard's own lock (a shard may run as its own process)
    DATA/shard-0000/wal/      WAL segments (oribus.shards.wal)
    DATA/shard-0000/snapshots/
    DATA/bus/sessions/        the bus's session journal (oribus.bus.session_journal)
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from oribus.bus.bus import Bus
from oribus.bus.session_journal import SessionJournal
from oribus.bus.sweep import TxnSweep
from oribus.datadir_lock import DataDirLock
from oribus.delivery_log import DeliveryLogConfig
from oribus.errors import DataCorrupted, InvalidRequest
from oribus.hosts.lifecycle import Teardown
from oribus.messages import TxnRef
from oribus.meta.slots import SLOTS, StaticSlotMap
from oribus.shards.config import DEFAULT_READ_LEASE_SECONDS, ShardConfig, check_retention
from oribus.shards.manifest import ShardManifest, read_manifest, write_manifest
from oribus.shards.shard import Shard
from oribus.shards.wal import WalConfig, latest_snapshot_lsn, list_segments
from oribus.types import DEFAULT_HISTORY_LIMIT, DEFAULT_MAX_VALUE_BYTES, parse_duration

log = logging.getLogger("oribus.engine")

LAYOUT_FILE = "layout.json"
DEFAULT_SHARDS = 1  # a new embedded data directory (``oribus up --processes``: 2)
# A shard's own defaults (ShardConfig, DeliveryLogConfig, WalConfig): the engine's are these.
_SHARD_DEFAULTS = ShardConfig(shard_id=0, data_dir=Path("."))


@dataclass
class EngineConfig:
    data_dir: Path  # where every shard keeps its WAL and snapshots
    # Number of shards, fixed for a data directory. None: what the directory was created
    # with, else DEFAULT_SHARDS. In one process the shards share one event loop, so more
    # than one buys no parallelism and turns multi-key commits into two-phase ones.
    shards: int | None = None
    history_limit: int = DEFAULT_HISTORY_LIMIT  # versions kept per key
    # Versions committed longer ago than this are dropped in the background (a key's current
    # one never is): seconds, or a duration such as "12h" or "7d"; None: no age limit.
    history_max_age: float | str | None = None
    # where versions older than the current one live: "memory" or "lmdb" (specs/engine.md)
    history_store: str = _SHARD_DEFAULTS.history_store
    max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES  # largest encoded value
    # idle sessions expire after this (their commits then fail closed)
    session_ttl_seconds: float = _SHARD_DEFAULTS.delivery_log.ttl_seconds
    max_entries_per_session: int = _SHARD_DEFAULTS.delivery_log.max_entries_per_session  # per session per shard
    max_sessions_per_shard: int = _SHARD_DEFAULTS.delivery_log.max_sessions  # live sessions per shard
    segment_bytes: int = _SHARD_DEFAULTS.wal.segment_bytes  # WAL segment size
    snapshot_every_records: int = _SHARD_DEFAULTS.snapshot_every_records  # WAL records between snapshots
    # prepared transactions older than this are resolved
    txn_expiry_seconds: float = _SHARD_DEFAULTS.txn_expiry_seconds
    # Read-only participants (specs/PROTOCOL.md §5.8): the lease a validation holds its read
    # locks for, and the bound on clock error between processes. Every process of this engine
    # runs on this machine's one clock (in-process shards, or `oribus up --processes`): 0.
    read_lease_seconds: float = DEFAULT_READ_LEASE_SECONDS
    clock_skew_seconds: float = 0.0
    unsafe_no_fsync: bool = False  # acknowledge before data reaches the disk: loses commits on power loss
    maintenance_interval: float = 1.0  # seconds between background chores
    unsafe_disable_validation: bool = False  # demo/testing only: accepts stale commits (no ORI checks)
    # Open even when a shard's data is lost (its directory, WAL or snapshot gone): start it
    # from what is left, possibly empty, and log a WARNING. Off: such an open is refused.
    unsafe_allow_empty: bool = False
    shard_overrides: dict = field(default_factory=dict)  # extra ShardConfig fields (tests)

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)
        if self.history_max_age is not None:
            try:
                self.history_max_age = parse_duration(self.history_max_age)
            except InvalidRequest as e:
                raise InvalidRequest(f"history_max_age: {e.message}") from None
        check_retention(self.history_limit, self.history_max_age)  # refused before anything opens

    @property
    def history_max_age_seconds(self) -> float | None:
        """``history_max_age`` in seconds (``__post_init__`` parsed a duration string)."""
        assert not isinstance(self.history_max_age, str)
        return self.history_max_age

    @property
    def session_journal_dir(self) -> Path:
        """Where the bus journals sessions of clients without tokens (HTTP agents)."""
        return self.data_dir / "bus" / "sessions"

    def shard_config(self, shard_id: int) -> ShardConfig:
        cfg = ShardConfig(
            shard_id=shard_id,
            data_dir=self.data_dir / f"shard-{shard_id:04d}",
            history_limit=self.history_limit,
            history_max_age_seconds=self.history_max_age_seconds,
            history_store=self.history_store,
            max_value_bytes=self.max_value_bytes,
            wal=WalConfig(segment_bytes=self.segment_bytes, unsafe_no_fsync=self.unsafe_no_fsync),
            snapshot_every_records=self.snapshot_every_records,
            delivery_log=DeliveryLogConfig(
                ttl_seconds=self.session_ttl_seconds,
                max_entries_per_session=self.max_entries_per_session,
                max_sessions=self.max_sessions_per_shard,
            ),
            txn_expiry_seconds=self.txn_expiry_seconds,
            read_lease_seconds=self.read_lease_seconds,
            clock_skew_seconds=self.clock_skew_seconds,
            # In one process a shard never restarts without its coordinators and writers, and
            # no message outlives them: no lease can be relied on across a restart (§5.8).
            # (Shard processes of `oribus up --processes` run `oribus shard`: grace on.)
            restart_grace=False,
            unsafe_disable_validation=self.unsafe_disable_validation,
            unsafe_allow_empty=self.unsafe_allow_empty,
        )
        return replace(cfg, **self.shard_overrides) if self.shard_overrides else cfg


def _read_layout(data_dir: Path) -> dict | None:
    """The data directory's layout (None: not created yet), its shard count checked."""
    path = Path(data_dir) / LAYOUT_FILE
    try:
        have = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise InvalidRequest(f"{path} is unreadable: {e}") from e
    shards = have.get("shards") if isinstance(have, dict) else None
    if not isinstance(shards, int) or isinstance(shards, bool) or shards < 1:
        raise InvalidRequest(f"{path} names no valid shard count: {have!r}")
    return have


def stored_shards(data_dir: Path) -> int | None:
    """The shard count a data directory was created with (None: no layout yet)."""
    have = _read_layout(data_dir)
    return None if have is None else have["shards"]


def check_layout(cfg: EngineConfig) -> None:
    """Create the data directory's layout, or check it matches ``cfg`` (resolving ``shards=None``)."""
    have = _read_layout(cfg.data_dir)
    if cfg.shards is None:
        cfg.shards = DEFAULT_SHARDS if have is None else have["shards"]
    if cfg.shards < 1:
        raise InvalidRequest("shards must be >= 1")
    if have is not None:
        if have["shards"] != cfg.shards or have.get("slots") != SLOTS:
            raise InvalidRequest(
                f"{cfg.data_dir} holds data for {have['shards']} shards; it cannot be opened "
                f"with {cfg.shards} (keys would map to other shards)"
            )
        _check_shard_dirs(cfg)
        return
    cfg.data_dir.mkdir(parents=True, exist_ok=True)
    # Every shard directory gets its MANIFEST before layout.json exists, so a layout whose
    # shard directory holds nothing means lost data, never a creation cut short.
    for i in range(cfg.shards):
        shard_dir = cfg.shard_config(i).data_dir
        if read_manifest(shard_dir) is None:
            write_manifest(shard_dir, ShardManifest(i), fsync=not cfg.unsafe_no_fsync)
    path = cfg.data_dir / LAYOUT_FILE
    want = {"format": 1, "shards": cfg.shards, "slots": SLOTS}
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        json.dump(want, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(cfg.data_dir, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_shard_dirs(cfg: EngineConfig) -> None:
    """Refuse a data directory whose layout names a shard whose directory is gone or empty.

    A shard directory holds a MANIFEST (or, if it predates manifests, WAL segments); the
    shard itself then checks that its log reaches the manifest's mark (specs/engine.md).
    """
    for i in range(cfg.shards or 0):
        shard = cfg.shard_config(i)
        if not shard.data_dir.is_dir():
            lost = f"directory {shard.data_dir} is missing"
        elif read_manifest(shard.data_dir) is None and not list_segments(shard.wal_dir) \
                and latest_snapshot_lsn(shard.snapshot_dir) is None:
            lost = f"directory {shard.data_dir} holds no MANIFEST, WAL segment or snapshot"
        else:
            continue
        if not cfg.unsafe_allow_empty:
            raise DataCorrupted(
                f"{cfg.data_dir / LAYOUT_FILE} names {cfg.shards} shards but shard {i}'s {lost}: its data "
                f"is lost. Restore it, or start the shard empty with --allow-empty (unsafe_allow_empty), "
                f"losing its commits",
                path=str(shard.data_dir), shard=i,
            )
        log.warning("shard %d's %s: starting it empty because unsafe_allow_empty is set; "
                    "its commits are lost", i, lost)


class EmbeddedEngine:
    """A bus over in-process shards. Use ``await EmbeddedEngine.open(config)`` and ``await close()``."""

    def __init__(self, config: EngineConfig, shards: dict[int, Shard],
                 journal: SessionJournal | None = None, dir_lock: DataDirLock | None = None,
                 teardown: Teardown | None = None) -> None:
        self.config = config
        self._dir_lock = dir_lock  # the data directory's lock (released by the teardown)
        self.shards = shards
        assert config.shards is not None, "check_layout resolves the shard count first"
        self.slot_map = StaticSlotMap(config.shards)
        self.journal = journal
        self.bus = Bus(dict(shards), self.slot_map.shard_for, max_value_bytes=config.max_value_bytes,
                       session_journal=journal)
        self.sweep = TxnSweep(
            self.bus, txn_expiry_seconds=config.txn_expiry_seconds, interval=config.maintenance_interval
        )
        # what open() started, stopped by close() in reverse: the lock, the shards, the journal,
        # the background chores
        self._teardown = teardown or Teardown(log)
        self._maintenance: asyncio.Task | None = None
        self._closed = False
        for shard in shards.values():
            shard.resolver = self._resolve

    @classmethod
    async def open(cls, config: EngineConfig) -> EmbeddedEngine:
        loop = asyncio.get_running_loop()
        teardown = Teardown(log)
        async with teardown.stop_on_error():
            # Before layout.json is read: a second process on this directory stops here.
            dir_lock = await loop.run_in_executor(None, DataDirLock.acquire, config.data_dir)
            teardown.push("data directory lock", dir_lock.release)
            await loop.run_in_executor(None, check_layout, config)
            assert config.shards is not None  # check_layout resolved it
            shards: dict[int, Shard] = {}
            for i in range(config.shards):
                shards[i] = await Shard.open(config.shard_config(i))
                teardown.push(f"shard {i}", shards[i].close)
            journal = await SessionJournal.open(config.session_journal_dir,
                                                unsafe_no_fsync=config.unsafe_no_fsync)
            teardown.push("session journal", journal.close)
            engine = cls(config, shards, journal, dir_lock, teardown)
            await engine.recover_prepared(older_than=0.0)
            await engine.release_settled()
            engine._maintenance = loop.create_task(engine._maintain())
            teardown.push_task("maintenance", engine._maintenance)
        return engine

    async def _resolve(self, shard_id: int, txn: TxnRef) -> None:
        await self.bus.coordinator.recover(shard_id, txn)

    async def recover_prepared(self, older_than: float) -> int:
        """Resolve prepared transactions older than ``older_than`` seconds. Returns how many."""
        return await self.sweep.resolve_expired(older_than)

    async def release_settled(self) -> int:
        """Release kept decisions that no participant still waits for. Returns how many."""
        return await self.sweep.release_settled()

    async def _maintain(self) -> None:
        while not self._closed:
            await asyncio.sleep(self.config.maintenance_interval)
            try:
                for shard in self.shards.values():
                    shard.expire_sessions()
                    shard.expire_leases()
                await self.sweep.run_once()
            except Exception:
                log.exception("maintenance failed")

    async def close(self) -> None:
        """Stop background work, flush and close every shard, let the directory go. Idempotent."""
        self._closed = True
        await self._teardown.stop()
