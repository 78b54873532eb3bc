"""Configuration of one shard server."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from oribus.delivery_log import DeliveryLogConfig
from oribus.errors import InvalidRequest
from oribus.shards.retention import COMPACTION_INTERVAL
from oribus.shards.wal import WalConfig
from oribus.shards.watch import DEFAULT_QUEUE_LIMIT
from oribus.types import DEFAULT_HISTORY_LIMIT, DEFAULT_MAX_VALUE_BYTES

WAL_DIR = "wal"  # below a shard's data_dir
DEFAULT_READ_LEASE_SECONDS = 2.0  # a read-only participant's lease (H)
# ε across machines (NTP keeps clocks within milliseconds); 0 is exact on one machine
DEFAULT_CLOCK_SKEW_SECONDS = 0.25
SNAPSHOT_DIR = "snapshots"  # below a shard's data_dir
HISTORY_DIR = "history"  # below a shard's data_dir: the on-disk history store's files
# Where versions older than the current one live (specs/engine.md "History store"):
# "memory" (deques in this process, in every snapshot) or "lmdb" (an LMDB file below
# data_dir; snapshots hold only current versions).
HISTORY_STORES = ("memory", "lmdb")
DEFAULT_HISTORY_STORE = "memory"
DEFAULT_HISTORY_CACHE_BYTES = 16 << 20  # decoded old versions an on-disk history store keeps for re-reads


def check_retention(history_limit: object, history_max_age_seconds: object) -> None:
    """Refuse a retention no shard could keep (``InvalidRequest``): a count below 1, an age that
    is not a positive finite number of seconds."""
    if type(history_limit) is not int or history_limit < 1:
        raise InvalidRequest(f"history_limit (versions kept per key) must be an integer >= 1, "
                             f"not {history_limit!r}")
    if history_max_age_seconds is None:
        return
    if (isinstance(history_max_age_seconds, bool) or not isinstance(history_max_age_seconds, (int, float))
            or not math.isfinite(history_max_age_seconds) or not history_max_age_seconds > 0):
        raise InvalidRequest(f"history_max_age (seconds) must be a positive finite number or None, "
                             f"not {history_max_age_seconds!r}")


@dataclass
class ShardConfig:
    shard_id: int  # which partition of the slot space this shard serves
    data_dir: Path  # this shard's own directory (WAL segments and snapshots live below it)
    history_limit: int = DEFAULT_HISTORY_LIMIT  # versions kept per key (history and rollback reach)
    # Versions committed longer ago than this many seconds are dropped by a background
    # compaction (a key's current version never is); None: no age limit (specs/engine.md
    # "Retention", oribus/shards/retention.py).
    history_max_age_seconds: float | None = None
    # Seconds between two steps of that compaction (each examines a bounded batch of keys).
    history_compaction_interval: float = COMPACTION_INTERVAL
    history_store: str = DEFAULT_HISTORY_STORE  # where older versions live: one of HISTORY_STORES
    history_cache_bytes: int = DEFAULT_HISTORY_CACHE_BYTES  # an on-disk history store's read cache
    max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES  # largest encoded value a write may carry
    wal: WalConfig = field(default_factory=WalConfig)  # segment size, unsafe_no_fsync
    snapshot_every_records: int = 200_000  # write a snapshot after this many WAL records
    delivery_log: DeliveryLogConfig = field(default_factory=DeliveryLogConfig)  # TTL and caps
    read_wait_seconds: float = 5.0  # how long a read waits for a transaction holding a write intent
    lock_wait_seconds: float = 1.0  # how long a one-phase commit waits for conflicting locks
    txn_expiry_seconds: float = 10.0  # a prepared transaction older than this is resolved via its primary
    # Read-only participants (specs/PROTOCOL.md §5.8): how long a validation holds its read
    # locks (the lease H), and the bound ε on clock error between this shard and any bus.
    read_lease_seconds: float = DEFAULT_READ_LEASE_SECONDS
    clock_skew_seconds: float = DEFAULT_CLOCK_SKEW_SECONDS
    # Refuse new write intents for read_lease_seconds + 2 * clock_skew_seconds after start:
    # leases granted before a crash were lost with it. Off only where every coordinator and
    # every writer lives and dies in this shard's process (the embedded engine).
    restart_grace: bool = True
    max_resolved_txns: int = 100_000  # outcomes kept for idempotent retries of a commit id
    watch_queue_limit: int = DEFAULT_QUEUE_LIMIT  # live changes queued per watcher; a fuller one is cut off
    # Demo/testing only: skip the ORI version checks, so commits based on stale reads are
    # ACCEPTED (locks stay). ``oribus demo`` uses it to show what validation prevents.
    unsafe_disable_validation: bool = False
    # Open a shard whose data is lost (its MANIFEST says the log reached an LSN the WAL and
    # snapshot no longer hold) by starting from what is left, possibly empty: the lost
    # commits are gone for good. Off, such a shard refuses to open (DataCorrupted).
    unsafe_allow_empty: bool = False

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)
        check_retention(self.history_limit, self.history_max_age_seconds)
        if not (self.history_compaction_interval > 0 and math.isfinite(self.history_compaction_interval)):
            raise InvalidRequest(f"history_compaction_interval must be a positive number of seconds, "
                                 f"not {self.history_compaction_interval!r}")
        if not self.read_lease_seconds > 0:
            raise InvalidRequest(f"read_lease_seconds must be > 0, not {self.read_lease_seconds!r}")
        if self.history_store not in HISTORY_STORES:
            raise InvalidRequest(f"history_store must be one of {', '.join(HISTORY_STORES)}, "
                                 f"not {self.history_store!r}")
        if not self.history_cache_bytes >= 0:
            raise InvalidRequest(f"history_cache_bytes must be >= 0, not {self.history_cache_bytes!r}")
        if not self.clock_skew_seconds >= 0:
            raise InvalidRequest(f"clock_skew_seconds must be >= 0, not {self.clock_skew_seconds!r}")

    @property
    def wal_dir(self) -> Path:
        return self.data_dir / WAL_DIR

    @property
    def snapshot_dir(self) -> Path:
        return self.data_dir / SNAPSHOT_DIR

    @property
    def history_dir(self) -> Path:
        return self.data_dir / HISTORY_DIR
